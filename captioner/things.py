"""What the thing in a photo is, in a word a person would say ("Probably a remote control."), or nothing.

The captioner learnt from Flickr8k's people and dogs; the photos blind people take are of screens, bottles, cans,
packages, remote controls, food. ImageNet's 1000 classes know many of those, and the captioner's own CNN still
holds what it learnt on ImageNet: its pooled feature through EfficientNet-Lite1's original ImageNet classifier
ranks the classes much as the original Lite1 does (measured: tools/fit_things.py), at no cost beyond one
[F] x [F, 1000] product, as the captioner computes that feature anyway.

The 1000 classes are too fine to say and often split one thing between them (water bottle, pop bottle, pill
bottle), so they are summed into GROUPS: the plain names a person would use. BROADER kinds (a screen, a box or
package) sum close groups, so a photo split between two of them can still be named honestly. A class in no group is
never named. A small logistic fit (tools/fit_things.py, on Flickr8k dev: a name is right where the photo's
references use one of its words) turns each name's probability into `score`, the estimated chance that the name
is right, and a name is said only where that score clears the fitted threshold, always worded as a guess
("Probably ...") unless the fit found a level that is honest as plain fact. The fit lives in a checkpoint under
"things" as plain types and tensors (`Things.state`), with the table's hash: a fit of another table is refused.
"""

import hashlib
import json
import math

import numpy as np

# how a name is said ("Probably a computer screen.": description.thing_sentence) lives with the rest of what a
# person hears

GROUPS_VERSION = 2

# The names said, each: (the words with which a caption calls it that, as a regular expression over lowercase
# words; {ImageNet class index: the class's name}). The class names are ImageNet's (timm.data.ImageNetInfo),
# checked by tools/fit_things.py. The words decide when a name counts as right in the fit: keep them honest.
DOG_BREEDS = {i: "dog breed" for i in range(151, 269)}  # ImageNet's 118 dog breeds, Chihuahua to Mexican hairless
BIRDS = {i: "bird species" for i in (*range(7, 25), *range(80, 101), *range(127, 147))}
GROUPS = {
    "a computer screen": ("screens?|monitors?|computers?|displays?|desktop",
                          {664: "monitor", 782: "screen, CRT screen", 527: "desktop computer"}),
    "a web page": ("web|website|webpage|page|screenshot|screens?|computer|site|internet",
                   {916: "web site"}),
    "a TV": ("tvs?|televisions?|screens?", {851: "television", 598: "home theater", 548: "entertainment center"}),
    "a laptop": ("laptops?|computers?|notebook", {620: "laptop", 681: "notebook computer"}),
    "a phone": ("phones?|cellphones?|iphones?|smartphones?|telephones?|mobile",
                {487: "cellular telephone", 528: "dial telephone", 707: "pay-phone", 590: "hand-held computer",
                 605: "iPod"}),  # on phones blind people photograph, iPod (a touch-screen slab) is often top
    "a keyboard": ("keyboards?|keys|keypad", {508: "computer keyboard", 878: "typewriter keyboard", 810: "space bar"}),
    "a remote control": ("remotes?|controls?|controller", {761: "remote control"}),
    "a package": ("packages?|packets?|bags?|wrappers?|packs?|pouch",
                  {692: "packet", 728: "plastic bag"}),
    "a box": ("box|boxes|carton|cartons|case", {478: "carton", 709: "pencil box"}),  # not crate: fires on scenes
    # ImageNet has no can (nor tin): cans come out as bottles (sunscreen, lotion, pill bottle) where they come out as
    # anything, so the name says both
    "a bottle or can": ("bottles?|cans?|tins?|lotion|spray|mouthwash|shampoo|jugs?|containers?|soda|coke",
                        {720: "pill bottle", 898: "water bottle", 907: "wine bottle", 440: "beer bottle",
                         737: "pop bottle", 631: "lotion", 838: "sunscreen", 585: "hair spray", 804: "soap dispenser",
                         711: "perfume", 899: "water jug", 901: "whiskey jug", 653: "milk can"}),
    "a jar": ("jars?|shakers?|spice", {773: "saltshaker"}),
    "a menu": ("menus?", {922: "menu"}),
    # ImageNet has no DVD; DVD and game cases, common in blind people's photos, come out as comic book / book jacket
    "a book or DVD": ("books?|dvds?|covers?|novel|magazines?|comic|binder|movie|case",
                      {921: "book jacket", 917: "comic book", 446: "binder"}),
    "a letter or page": ("letters?|papers?|pages?|envelopes?|mail|document|sheet|puzzle|crossword",
                         {549: "envelope", 918: "crossword puzzle"}),
    # not abaya or pajama: on Flickr8k they fire on headscarves, robes and small children
    "clothing": ("shirts?|t-shirt|jerseys?|jackets?|coats?|sweaters?|sweatshirt|hoodie|jeans|dress|suit|uniforms?|"
                 "clothes|clothing|skirt|top|robes?",
                 {610: "jersey, T-shirt", 841: "sweatshirt", 474: "cardigan", 834: "suit", 869: "trench coat",
                  608: "jean", 655: "miniskirt", 578: "gown", 568: "fur coat", 735: "poncho", 617: "lab coat",
                  652: "military uniform"}),
    "shoes": ("shoes?|sneakers?|boots?|sandals?|feet|foot|footwear",
              {770: "running shoe", 630: "Loafer", 774: "sandal", 514: "cowboy boot", 502: "clog"}),
    "food": ("food|meal|plate|dish|pizza|sandwich|burger|hamburger|hot ?dogs?|fruit|vegetables?|bread|cake|"
             "ice cream|eating|eats|banana|apple|oranges?|lemon|broccoli|corn|mushrooms?|salad|soup|pasta|snack",
             {i: "food" for i in (*range(924, 968), 969, 987)}),
    "a plate or bowl": ("plates?|bowls?|dish|dishes", {923: "plate", 809: "soup bowl", 659: "mixing bowl"}),
    "a cup or mug": ("cups?|mugs?|glass|coffee|drink|drinking", {968: "cup", 504: "coffee mug", 441: "beer glass"}),
    "a dog": ("dogs?|puppy|puppies|pup", DOG_BREEDS),
    "a cat": ("cats?|kitten|kitty|kittens", {281: "tabby", 282: "tiger cat", 283: "Persian cat",
                                             284: "Siamese cat", 285: "Egyptian cat"}),
    "a bird": ("birds?|duck|ducks|geese|goose|seagulls?|gulls?|pigeons?|swans?|chickens?|hen|rooster|owl|eagle|"
               "flamingo|pelican|penguins?|heron|parrot|crane|stork|ostrich|peacock", BIRDS),
    "a horse": ("horses?|pony|ponies|stallion|mare|foal", {339: "sorrel"}),
    # a rival for "a dog" as much as a name: without it a calf or a lamb was "a dog" (by eye, 2 of 50 dev photos)
    "a farm animal": ("cows?|cattle|calf|calves|bulls?|ox|oxen|sheep|lambs?|goats?|pigs?|hogs?|llamas?|farm",
                      {345: "ox", 346: "water buffalo", 341: "hog", 348: "ram", 349: "bighorn", 355: "llama"}),
    # "a bike", not "a bicycle": mountain bike fires on dirt bikes too (ImageNet has no motorcycle). Not unicycle or
    # tricycle: on Flickr8k they fire on children running, jumping and riding toys
    "a bike": ("bikes?|bicycles?|bicyclists?|cyclists?|bikers?|bmx|motorcycles?|motorbikes?|motocross|scooters?|moped",
               {671: "mountain bike", 444: "tandem bicycle", 665: "moped", 670: "motor scooter"}),
    "a ball": ("balls?|football|soccer|basketball|volleyball|baseball|rugby|tennis|golf",
               {805: "soccer ball", 430: "basketball", 768: "rugby ball", 852: "tennis ball", 890: "volleyball",
                429: "baseball", 574: "golf ball", 722: "ping-pong ball"}),  # not croquet ball: fires on frisbees
    "a car": ("cars?|vehicles?|jeep|truck|suv|van|taxi|racecar|automobile",
              {436: "station wagon", 511: "convertible", 627: "limousine", 656: "minivan", 817: "sports car",
               751: "race car", 468: "taxicab", 609: "jeep", 661: "Model T", 717: "pickup"}),
    # No boat: on Flickr8k dev its classes (speedboat, catamaran, lifeboat...) fired on surfers, water-skiers and
    # windsurfers, right on 14 of 19 photos named. No bank card, banknote or coin: ImageNet has no such class.
    "a sign": ("signs?|signpost|sticker|placard|billboard", {919: "street sign"}),
    "a clock": ("clocks?|watch", {409: "analog clock", 892: "wall clock", 530: "digital clock"}),
}

# Broader kinds, each: (its words, the groups it sums). Said where the groups split the probability between them
# and none of them alone is sure enough.
BROADER = {
    "a screen": ("screens?|monitors?|computers?|displays?|tvs?|televisions?|laptops?|web|website|screenshot",
                 ("a computer screen", "a web page", "a TV", "a laptop")),
    "a bottle, can or jar": ("bottles?|cans?|lotion|spray|mouthwash|jars?|containers?|soda|coke|drink",
                             ("a bottle or can", "a jar")),
    "a box or package": ("box|boxes|packages?|packets?|bags?|cartons?|wrappers?|packs?|case",
                         ("a box", "a package")),
    "something printed": ("books?|dvds?|menus?|letters?|papers?|pages?|envelopes?|documents?|magazines?|covers?|"
                          "sheet|flyers?|print|printed",
                          ("a book or DVD", "a menu", "a letter or page")),
    "an animal": ("animals?|dogs?|puppy|puppies|cats?|kitten|birds?|horses?|pony|pet|cows?|sheep|goats?|lambs?",
                  ("a dog", "a cat", "a bird", "a horse", "a farm animal")),
}

SIGNALS = ("logit_p", "logit_margin", "broader")  # of each name: see signals()
CLIP = 1e-4  # probabilities clipped to [CLIP, 1 - CLIP] before their logit: 9.2 at most either way


class ThingsError(Exception):
    """A things state that cannot be used with this table (a stale fit), as one line."""


def table_hash():
    """A short hash of GROUPS and BROADER: a fit made with another table (other classes, names or words) is
    stale, as its calibration learnt what those names' probabilities meant."""
    table = [GROUPS_VERSION, {n: (w, sorted(c)) for n, (w, c) in GROUPS.items()}, BROADER]
    return hashlib.blake2b(json.dumps(table, sort_keys=True).encode(), digest_size=8).hexdigest()


def names():
    """Every name that can be said: the groups first, then the broader kinds."""
    return [*GROUPS, *BROADER]


def classes():
    """The ImageNet classes each name (names()) sums, as sorted lists; a broader kind sums its groups' classes."""
    fine = [sorted(c) for _, c in GROUPS.values()]
    broad = [sorted({i for g in groups for i in GROUPS[g][1]}) for _, groups in BROADER.values()]
    return fine + broad


def membership():
    """[C, 1000] 0/1 float64: which ImageNet classes each name (names()) sums."""
    m = np.zeros((len(GROUPS) + len(BROADER), 1000))
    for i, summed in enumerate(classes()):
        m[i, summed] = 1.0
    return m


def _logit(p):
    p = np.clip(p, CLIP, 1 - CLIP)
    return np.log(p) - np.log1p(-p)


def disjoint_groups(member):
    """[C, G] bool: which groups share no class with each name (its possible rivals). member: membership()."""
    return (member @ member[:len(GROUPS)].T) == 0  # [C, 1000] @ [1000, G] -> [C, G]


def signals(probs, member=None, disjoint=None):
    """ImageNet probabilities [N, 1000] (NumPy or PyTorch) -> (each name's probability [N, C], its signals
    [N, C, len(SIGNALS)]), float64 NumPy: the logit of its probability; that minus the logit of its likeliest rival,
    the likeliest group it does not sum (a name far ahead of the next is surer than one just ahead); and whether it
    is a broader kind. member, disjoint: membership() and disjoint_groups(), made once by a caller that calls
    often."""
    member = membership() if member is None else member  # [C, 1000]
    disjoint = disjoint_groups(member) if disjoint is None else disjoint  # [C, G]
    p = np.asarray(probs, dtype=np.float64) @ member.T  # [N, 1000] -> [N, C]
    rival = (p[:, None, :len(GROUPS)] * disjoint).max(2)  # [N, 1, G] * [C, G] -> [N, C, G] -> [N, C]
    broader = np.zeros_like(p)
    broader[:, len(GROUPS):] = 1.0
    return p, np.stack([_logit(p), _logit(p) - _logit(rival), broader], 2)  # [N, C, 3]


def candidates(p):
    """Each photo's two candidate names, by probability [N, C]: its likeliest group and its likeliest broader
    kind -> indices into names() [N, 2]. The fit scores these two; the group is said where it is sure enough,
    else the broader kind where that is."""
    g = len(GROUPS)
    return np.stack([p[:, :g].argmax(1), g + p[:, g:].argmax(1)], 1)  # [N, 2]


def calibrate(sig, calibration):
    """Signals [..., S] (NumPy or PyTorch) -> score [...], float64 NumPy: the fitted logistic regression on the
    standardised signals."""
    mean, std, weights = (np.asarray(calibration[k], dtype=np.float64) for k in ("mean", "std", "weights"))
    z = ((np.asarray(sig, dtype=np.float64) - mean) / std) @ weights + calibration["bias"]
    with np.errstate(over="ignore"):  # a score of 0 where exp overflows, as it should
        return 1.0 / (1.0 + np.exp(-z))


def decide(score, cand, thresholds):
    """score [N, 2] of candidates cand [N, 2] (indices into names()) -> per photo None or (index, score, level):
    the group where its score clears thresholds["medium"], else the broader kind where its does."""
    out = []
    for s, c in zip(score.tolist(), cand.tolist()):
        k = 0 if s[0] >= thresholds["medium"] else 1 if s[1] >= thresholds["medium"] else None
        if k is None:
            out.append(None)
            continue
        high = thresholds.get("high")
        out.append((c[k], s[k], "high" if high is not None and s[k] >= high else "medium"))
    return out


def cnn_fingerprint(backbone):
    """A short hash of a CNN's weights: a fit holds only for the features of the CNN it was made on (a captioner
    retrained with a CNN that learns sees otherwise)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in backbone.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Things:
    """The head, from its state (a checkpoint's "things"): pooled CNN features -> a name per photo, or None.
    backbone: the captioner's CNN, to refuse a fit made on another CNN's features (None: not checked)."""

    def __init__(self, state, backbone=None):
        """state: a checkpoint's "things" (make_state), or from_rules' state rebuilt from export_rules."""
        refit = "refit it with python tools/fit_things.py --write CHECKPOINT"
        if state.get("table") != table_hash():
            raise ThingsError(f"the things fit was made for another group table ({state.get('table')}, this code's "
                              f"is {table_hash()}): {refit}")
        if backbone is not None and state.get("cnn") != cnn_fingerprint(backbone):
            raise ThingsError(f"the things fit was made on another CNN's features than this model's: {refit}")
        self.state = state
        self.member = membership()  # [C, 1000]
        self.disjoint = disjoint_groups(self.member)  # [C, G]
        # float64, as web/describe.js computes in JavaScript's numbers: both say the same
        self.weight = np.asarray(state["classifier_weight"], dtype=np.float64)  # [1000, F]; stored in fp16
        self.bias = np.asarray(state["classifier_bias"], dtype=np.float64)  # [1000]

    @classmethod
    def from_rules(cls, rules, weight):
        """The head export_rules wrote: its rules (captioner.json's "things") and its classifier weight [1000, F]
        (things.f16), without PyTorch."""
        state = {"table": rules["table"], "classifier_weight": weight, "classifier_bias": rules["bias"],
                 **rules["calibration"], "thresholds": rules["thresholds"]}
        return cls(state)

    def probs(self, pooled_raw):
        """Pooled raw features [N, F] (the un-normalised mean of the CNN's last feature map; NumPy or PyTorch) ->
        ImageNet class probabilities [N, 1000], float64 NumPy."""
        z = np.asarray(pooled_raw, dtype=np.float64) @ self.weight.T + self.bias  # [N, F] -> [N, 1000]
        e = np.exp(z - z.max(1, keepdims=True))  # a softmax, safe from overflow
        return e / e.sum(1, keepdims=True)

    def assess(self, pooled_raw):
        """Pooled raw features [N, F] (of the CNN in eval mode; NumPy or PyTorch) -> per photo None (not sure of
        any name) or {"name": "a computer screen", "score": estimated chance that the name is right, "level":
        "medium"|"high"}."""
        p, sig = signals(self.probs(pooled_raw), self.member, self.disjoint)  # [N, C], [N, C, S]
        cand = candidates(p)  # [N, 2]
        score = calibrate(np.take_along_axis(sig, cand[:, :, None], 1), self.state)  # [N, 2, S] -> [N, 2]
        every = names()
        return [None if d is None else {"name": every[d[0]], "score": round(d[1], 3), "level": d[2]}
                for d in decide(score, cand, self.state["thresholds"])]


def make_state(classifier_weight, classifier_bias, calibration, thresholds, cnn, **about):
    """The plain state that a checkpoint stores under "things": the ImageNet classifier [1000, F] in fp16 and
    its bias [1000], the calibration ("mean", "std", "weights" over SIGNALS, "bias"), the levels' thresholds
    ({"medium": float, "high": float or None: never}), the table's hash, the fingerprint of the CNN whose
    features it was fitted on (cnn_fingerprint), and plain facts about the fit."""
    if not all(math.isfinite(v) for v in [*calibration["weights"], calibration["bias"]]):
        raise ValueError("the things calibration did not converge (a weight is not finite): nothing to store")
    return {"version": GROUPS_VERSION, "table": table_hash(), "cnn": cnn, "signals": list(SIGNALS),
            "classifier_weight": classifier_weight.detach().half().cpu(),
            "classifier_bias": classifier_bias.detach().float().cpu(),
            **{k: calibration[k] for k in ("mean", "std", "weights", "bias")}, "thresholds": dict(thresholds),
            **about}


def export_rules(head):
    """A Things head as (plain JSON types, its classifier weight [1000, F] as a float16 NumPy array), for the runners
    that cannot import this file (web/describe.js) and to rebuild it without PyTorch (Things.from_rules). The export
    writes the weight, little-endian, to the file the rules name."""
    s = head.state
    weight = np.asarray(s["classifier_weight"], dtype=np.float16)  # [1000, F]: fp16 already, so exactly as fitted
    rules = {"table": table_hash(), "names": names(), "classes": classes(), "groups": len(GROUPS),
             "signals": list(SIGNALS), "clip": CLIP,
             "calibration": {k: s[k] for k in ("mean", "std", "weights", "bias")},
             "thresholds": dict(s["thresholds"]), "bias": head.bias.tolist(),
             "classifier": {"file": "things.f16", "shape": list(weight.shape)}}
    return rules, weight
