"""How good captions are, as captioning papers score them: pycocoevalcap's BLEU, METEOR, ROUGE-L and CIDEr over
PTB-tokenised captions (Java's tokenizer where Java is installed, `python_tokenize`, its equivalent, where not), and
CIDEr-D per caption (CiderD: self-critical training's reward and the confidence calibration's target).
evaluate.py scores a checkpoint with these; training scores its dev split with them."""

import math
import re
import shutil
import subprocess
from collections import Counter

import torch
from tqdm import tqdm

from captioner.search import generate
from utils import autocast

# What pycocoevalcap's PTBTokenizer drops after tokenising (it lowercases first, so its brackets, written
# -lrb- and so on, stay), plus the double quote, which PTB turns into `` or '' before dropping it.
PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


# PTB rules that matter for captions: split off clitics, "cannot" and punctuation; keep hyphenated words,
# abbreviations (mr., s.c.u.b.a., p.) and numbers whole.
_CLITICS = re.compile(r"(\w)('s|'re|'ve|'ll|'d|'m|n't)\b")
_CANNOT = re.compile(r"\bcannot\b")
_TOKENS = re.compile(r"(?:mrs?|ms|dr|st|jr|sr|vs|mt)\.|(?:[a-z]\.)+|[a-z0-9]+(?:[-'./][a-z0-9]+)*|n't|'[a-z]+"
                     r"|\.\.\.|--|``|''|\S")


def python_tokenize(text):
    """Lowercased PTB-style tokens with punctuation removed, as pycocoevalcap's PTBTokenizer gives them."""
    text = _CANNOT.sub("can not", _CLITICS.sub(r"\1 \2", text.lower().replace("\n", " ")))
    tokens = (_BRACKETS.get(t, t) for t in _TOKENS.findall(text))
    return " ".join(t for t in tokens if t not in PUNCTUATION)


def java_available():
    if shutil.which("java") is None:
        return False
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tokenize_all(texts, java):
    """Tokenise a list of captions: one PTBTokenizer call for all of them, or the Python equivalent."""
    if not java:
        return [python_tokenize(t) for t in texts]
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [out[i][0] for i in range(len(texts))]


def score_captions(references, hypotheses, java=None, metrics=("bleu", "meteor", "rouge", "cider"), bar=None):
    """Corpus scores of hypotheses[i] against references[i] (a list of texts).

    Returns {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} as asked for; METEOR only where Java is.
    bar: a progress bar of the scorers (METEOR alone takes most of a minute on 1,000 captions): True on any
    stderr, None on a terminal only."""
    java = java_available() if java is None else java
    metrics = [m for m in metrics if m != "meteor" or java]
    flat = [r for refs in references for r in refs] + list(hypotheses)
    with tqdm(total=len(metrics) + 1, desc="scoring: tokenizing", unit="step", leave=False,
              disable=None if bar is None else not bar) as progress:
        tokens = tokenize_all(flat, java)
        gts, res, k = {}, {}, 0
        for i, refs in enumerate(references):
            gts[i], k = tokens[k:k + len(refs)], k + len(refs)
        for i in range(len(hypotheses)):
            res[i] = [tokens[k + i]]
        scores = {}
        for metric in metrics:
            progress.update()
            progress.set_description(f"scoring: {metric}")
            scores.update(_score(metric, gts, res))
        progress.update()
    return {k: float(v) for k, v in scores.items()}


def _score(metric, gts, res):
    """One pycocoevalcap scorer's corpus scores of the tokenised captions `res` against `gts`."""
    if metric == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        return {f"Bleu_{n + 1}": b for n, b in enumerate(bleu)}
    if metric == "meteor":
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()  # a Java subprocess, ended when the object is deleted
        score, _ = meteor.compute_score(gts, res)
        del meteor
        return {"METEOR": score}
    if metric == "rouge":
        from pycocoevalcap.rouge.rouge import Rouge

        return {"ROUGE_L": Rouge().compute_score(gts, res)[0]}
    from pycocoevalcap.cider.cider import Cider

    return {"CIDEr": Cider().compute_score(gts, res)[0]}


def _ngrams(seq, n):
    return Counter(tuple(seq[i:i + k]) for k in range(1, n + 1) for i in range(len(seq) - k + 1))


class CiderD:
    """CIDEr-D of single captions, computed as pycocoevalcap's Cider computes it (tf-idf n-gram vectors,
    n = 1..4, clipped, with a Gaussian length penalty, x10), but with the document frequencies of a fixed
    corpus, the training references: the reward of self-critical training. Works on any token sequences
    (here word ids); equal to pycocoevalcap's per-caption scores when built from the scored references."""

    def __init__(self, references, n=4, sigma=6.0):
        """references: per image, a list of token sequences."""
        self.n, self.sigma = n, sigma
        self.df = Counter(g for refs in references for g in set().union(*(_ngrams(r, n) for r in refs)))
        self.log_docs = math.log(len(references))

    def vector(self, seq):
        """(per n: {n-gram: tf-idf weight}, per n: norm, length) of one token sequence."""
        vec, norm = [{} for _ in range(self.n)], [0.0] * self.n
        for g, tf in _ngrams(seq, self.n).items():
            w = tf * (self.log_docs - math.log(max(1.0, self.df[g])))
            vec[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
        return vec, [math.sqrt(x) for x in norm], len(seq)

    def score(self, seq, ref_vectors):
        """CIDEr-D of one caption against its references, given as `vector`s."""
        vec, norm, length = self.vector(seq)
        total = 0.0
        for ref_vec, ref_norm, ref_length in ref_vectors:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                if norm[k] and ref_norm[k]:
                    dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                    total += penalty * dot / (norm[k] * ref_norm[k])
        return 10.0 * total / (self.n * len(ref_vectors))


@torch.no_grad()
def caption_loader(model, batches, vocab, device, beam=3, length_penalty=0.0, max_len=40, desc="captioning",
                   precision="auto", bar=None):
    """Captions for every image of a Batches: {image name: text}. bar: the progress bar on any stderr (True), or
    on a terminal only (None)."""
    model.eval()
    out = {}
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=None if bar is None else not bar):
        with autocast(device, precision):
            ids = generate(model, batch.x, max_len=max_len, beam=beam, length_penalty=length_penalty,
                                 from_features=batches.from_features)
        out.update((n, vocab.decode(s)) for n, s in zip(batch.names, ids))
    return out


def per_image_cider(references, hypotheses):
    """Each hypothesis's CIDEr-D against its own references (python_tokenize, the scored references' document
    frequencies: as pycocoevalcap's per-image scores, whose mean is its CIDEr): a float tensor [N]."""
    refs = [[python_tokenize(r).split() for r in rs] for rs in references]
    cider = CiderD(refs)
    return torch.tensor([cider.score(python_tokenize(h).split(), [cider.vector(r) for r in rs])
                         for h, rs in zip(hypotheses, refs)])
