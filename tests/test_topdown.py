"""The top-down decoder (--decoder topdown): everything that works with the attention decoder works with it, and
checkpoints made before it load as they were made."""

import json
import math

import pytest
import torch
from torch import nn

import export
import image_intial_model as M
import image_training
from captioner import search
from captioner.backbones import preprocessing
from captioner.batches import Batch, CaptionTable
from captioner.confidence import SIGNALS, captions_with_signals, decoder_signals, pooled_mean
from captioner.describe import Captioner
from captioner.ensemble import Ensemble
from captioner.runner import Runner
from captioner.search import generate
from captioner.training import WordLoss
from image_intial_model import CNN_RNN, ModelArgs
from image_loader import SPECIALS, Vocab
from tests.conftest import SAMPLE, train_args
from utils import SHIPPED_CHECKPOINT, checkpoint_state, load_checkpoint, model_from_checkpoint, save_checkpoint

PHOTOS = [SAMPLE / "Images" / n for n in ("2364096157_eb7970a69a.jpg", "1022454332_6af2c1449a.jpg",
                                          "2935986346_29df6cf692.jpg")]


def _model(seed=0, decoder="topdown", vocab_size=40, embed_size=32, **kwargs):
    """A small random-weight model (efficientnet_lite0 at 224 px: 7x7 regions), in eval mode (no dropout)."""
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=vocab_size, encoder="efficientnet_lite0", embed_size=embed_size, hidden_size=48,
                     attention_dim=16, decoder=decoder, **kwargs)
    return CNN_RNN(args, weights="random").eval()


@pytest.fixture(scope="module")
def topdown():
    return _model()


def _tokens(captions):
    """Word ids without SOS/EOS -> (tokens [N, T]: SOS w1 .. wn, words [N, T]: w1 .. wn EOS), padded."""
    words = torch.zeros(len(captions), max(map(len, captions)) + 1, dtype=torch.long)
    for i, ids in enumerate(captions):
        words[i, :len(ids) + 1] = torch.tensor([*ids, M.EOS_IDX])
    return torch.cat([torch.full_like(words[:, :1], M.SOS_IDX), words[:, :-1]], 1), words


def test_the_topdown_shape_and_its_config():
    args = ModelArgs(vocab_size=10, decoder="topdown")
    assert args.attention and args.decoder == "topdown"
    assert [ModelArgs(10, decoder=d).decoder for d in M.DECODERS] == list(M.DECODERS)
    with pytest.raises(ValueError, match="unknown decoder 'fancy'"):
        ModelArgs(vocab_size=10, decoder="fancy")
    dec = _model().decoderRNN
    assert isinstance(dec, M.TopDownDecoder) and dec.att_lstm.input_size == 48 + 2 * 32
    assert dec.lang_lstm.input_size == 32 + 48 and len(dec.state_batch_axes) == len(dec.start(torch.randn(2, 5, 32)))


@pytest.mark.slow
def test_forward_shapes_teacher_forcing_and_the_word_by_word_log_probs(topdown):
    images = torch.randn(2, 3, 224, 224)
    assert topdown.encoderCNN.extract(images).shape == (2, 49, 1280)  # it reads the regions, as attention does
    tokens = torch.randint(4, 40, (3, 6))
    logits, weights = topdown(images, tokens, image_index=torch.tensor([0, 1, 1]), with_attention=True)
    assert logits.shape == (3, 6, 40) and weights.shape == (3, 6, 49)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 6))
    alone = topdown(images[1:], tokens[1:], image_index=torch.tensor([0, 0]))  # image 1 alone: the same logits
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-4)
    captions = generate(topdown, images, max_len=8, beam=3)
    logp, words = search.word_log_probs(topdown, images, captions)  # step by step, as generation reads
    assert logp.shape == (2, max(map(len, captions)) + 1, 40)
    tokens, expected = _tokens(captions)
    assert torch.equal(words, expected)
    with torch.no_grad():  # the batched pass over the caption, with generation's banned words banned
        forward = topdown(images, tokens).masked_fill(torch.isin(torch.arange(40), torch.tensor(M.NEVER_SAY)),
                                                      -math.inf).log_softmax(-1)
    for i, ids in enumerate(captions):
        torch.testing.assert_close(logp[i, :len(ids) + 1], forward[i, :len(ids) + 1], atol=1e-5, rtol=1e-5)
    same, _ = search.teacher_forced(topdown.decoderRNN, topdown.features(images), captions)
    torch.testing.assert_close(same, logp)


def test_beam_one_is_greedy_and_a_batch_captions_as_one_image_at_a_time(topdown):
    regions = torch.randn(5, 49, 1280) * 3
    greedy = generate(topdown, regions, max_len=10, from_features=True)
    assert generate(topdown, regions, max_len=10, beam=1, from_features=True) == greedy
    assert search.beam_search(topdown.decoderRNN, topdown.features(regions, True), 10, 1) == greedy
    beams = generate(topdown, regions, max_len=10, beam=3, from_features=True)
    assert all(len(s) <= 10 and not set(s) & set(M.NEVER_SAY) and M.EOS_IDX not in s for s in beams)
    for i in range(5):
        one = regions[i:i + 1]
        assert generate(topdown, one, max_len=10, from_features=True) == greedy[i:i + 1]
        assert generate(topdown, one, max_len=10, beam=3, from_features=True) == beams[i:i + 1]


def test_n_best_captions_carry_their_own_log_probabilities(topdown):
    regions = torch.randn(2, 49, 1280) * 3
    best = search.n_best(topdown, regions, 3, max_len=10, beam=4, from_features=True)
    assert [len(b) for b in best] == [3, 3]
    assert [b[0]["ids"] for b in best] == generate(topdown, regions, max_len=10, beam=4, from_features=True)
    for i, captions in enumerate(best):
        assert [c["log_prob"] for c in captions] == sorted((c["log_prob"] for c in captions), reverse=True)
        for c in captions:
            words = torch.tensor([c["ids"] + [M.EOS_IDX] * (c["length"] > len(c["ids"]))])
            tokens = torch.cat([torch.tensor([[M.SOS_IDX]]), words[:, :-1]], 1)
            with torch.no_grad():
                logits = topdown(regions[i:i + 1], tokens, from_features=True)
            assert c["log_prob"] == pytest.approx(search.caption_log_probs(logits, words).item(), abs=1e-4)


def test_attention_maps_are_the_weights_each_word_was_chosen_with(topdown):
    regions = torch.randn(2, 49, 1280) * 3
    seen, weights = [], topdown.decoderRNN._weights

    def record(h, keys):  # the weights the decoder computes while it generates, step by step
        seen.append(weights(h, keys))
        return seen[-1]

    topdown.decoderRNN._weights = record
    try:
        captions = generate(topdown, regions, max_len=6, from_features=True)
    finally:
        del topdown.decoderRNN._weights
    maps = topdown.attention_maps(regions, captions, from_features=True)
    for i, (ids, m) in enumerate(zip(captions, maps)):
        assert m.shape == (len(ids), 7, 7)
        torch.testing.assert_close(m.sum((1, 2)), torch.ones(len(ids)))
        torch.testing.assert_close(m.flatten(1), torch.stack([w[i] for w in seen[:len(ids)]]))


@pytest.mark.slow
def test_it_learns_one_batch_until_greedy_reproduces_its_captions():
    model = _model(vocab_size=12, dropout=0.0).train()
    feats = torch.randn(4, 49, 1280)
    captions = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 8, 2, 0], [1, 9, 10, 11, 2], [1, 4, 8, 10, 2]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        logits = model(feats, captions[:, :-1], from_features=True)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 12), captions[:, 1:].reshape(-1), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert generate(model.eval(), feats, from_features=True) == [[4, 5, 6], [7, 8], [9, 10, 11], [4, 8, 10]]


def test_the_attention_penalty_reads_the_weights_each_word_was_predicted_with(topdown):
    """--attention-reg with the top-down decoder: the word loss grows by lambda x the sum over captions and
    regions of (1 - the region's weights summed over the caption's words)^2, the weights recorded step by step."""
    regions = torch.randn(2, 49, 1280) * 3
    captions = [[M.SOS_IDX, 7, 8, 9, M.EOS_IDX], [M.SOS_IDX, 10, M.EOS_IDX], [M.SOS_IDX, 11, 12, M.EOS_IDX]]
    table = CaptionTable([captions[:2], captions[2:]], torch.device("cpu"))
    batch = Batch(regions, *table.batch(torch.tensor([0, 1])), names=["a", "b"])
    tokens, targets = batch.captions[:, :-1], batch.captions[:, 1:]
    out = topdown(batch.x, tokens, batch.image_index, from_features=True, with_attention=True)
    plain, plain_figure = WordLoss()(out[0], targets)
    loss, figure = WordLoss(attention_reg=0.5)(out, targets)
    dec, feats, penalty = topdown.decoderRNN, topdown.features(regions, True), 0.0
    with torch.no_grad():
        for ids, image in zip(captions, (0, 0, 1)):
            state, looked = dec.start(feats[image:image + 1]), torch.zeros(49)
            for word in ids[:-1]:
                _, state, w = dec.advance(dec.embed(torch.tensor([word])), state)
                looked += w[0]
            penalty += ((1 - looked) ** 2).sum()
    assert torch.equal(figure, plain_figure)
    torch.testing.assert_close(loss - plain, 0.5 * penalty, rtol=1e-4, atol=1e-4)


def _mean_probability_log_prob(models, images, caption):
    """log of the members' mean teacher-forced probabilities, summed over a caption's words (EOS included)."""
    words = torch.tensor([caption["ids"] + [M.EOS_IDX] * (caption["length"] > len(caption["ids"]))])
    tokens = torch.cat([torch.tensor([[M.SOS_IDX]]), words[:, :-1]], 1)
    probs = []
    with torch.no_grad():
        for m in models:
            logits = m(images, tokens)
            logits[..., M.NEVER_SAY] = -math.inf
            probs.append(logits.softmax(-1).gather(-1, words.unsqueeze(-1)).squeeze(-1))
    return torch.stack(probs).mean(0).log().sum().item()


@pytest.mark.slow
@pytest.mark.parametrize("other", ["topdown", "attention"])
def test_an_ensemble_with_a_topdown_model_shares_the_cnn_and_averages_the_probabilities(topdown, other):
    second = _model(seed=1, decoder=other, embed_size=24)
    second.encoderCNN.backbone.load_state_dict(topdown.encoderCNN.backbone.state_dict())
    ensemble = Ensemble([topdown, second])
    assert ensemble.shared_cnn and ensemble.args.decoder == ("topdown" if other == "topdown" else "attention")
    assert ensemble.decoder_kind == f"topdown + {other}"
    images = torch.randn(2, 3, 96, 96) * 3  # 3x3 regions: quick
    best = search.n_best(ensemble, images, 2, max_len=8, beam=3)
    assert [b[0]["ids"] for b in best] == generate(ensemble, images, max_len=8, beam=3)
    assert generate(ensemble, images, max_len=8, beam=1) == generate(ensemble, images, max_len=8)
    for i, captions in enumerate(best):
        for c in captions:
            assert c["log_prob"] == pytest.approx(_mean_probability_log_prob((topdown, second), images[i:i + 1], c),
                                                  abs=1e-4)
    ids = [b[0]["ids"] for b in best]
    for mean, a, b in zip(ensemble.attention_maps(images, ids), topdown.attention_maps(images, ids),
                          second.attention_maps(images, ids)):
        torch.testing.assert_close(mean, (a + b) / 2)


@pytest.mark.slow
def test_an_ensemble_of_a_topdown_and_a_plain_model_runs_each_cnn(topdown):
    plain = _model(seed=3, decoder="plain")
    plain.encoderCNN.backbone.load_state_dict(topdown.encoderCNN.backbone.state_dict())
    ensemble = Ensemble([topdown, plain])
    assert not ensemble.shared_cnn and not ensemble.args.attention and ensemble.args.decoder == "plain"  # no maps
    assert ensemble.decoder_kind == "topdown + plain"
    images = torch.randn(2, 3, 64, 64)
    assert generate(ensemble, images, max_len=8, beam=1) == generate(ensemble, images, max_len=8)
    assert all(len(ids) <= 8 for ids in generate(ensemble, images, max_len=8, beam=3))


@pytest.mark.slow
def test_confidence_signals_of_a_topdown_model_and_its_ensemble(topdown):
    x = torch.randn(3, 3, 64, 64)  # 2x2 regions: quick
    attention = _model(seed=2, decoder="attention")
    attention.encoderCNN.backbone.load_state_dict(topdown.encoderCNN.backbone.state_dict())
    for net in (topdown, Ensemble([topdown, attention])):
        ids, best, decoder, pooled = captions_with_signals(net, x, beam=3, max_len=6, n_best=2)
        assert ids == generate(net, x, max_len=6, beam=3) and [len(b) for b in best] == [2, 2, 2]
        assert decoder.shape == (3, len(SIGNALS) - 1) and torch.isfinite(decoder).all()
        assert (decoder[:, 0] <= 0).all() and (decoder[:, 4] > 0).all()  # log-probabilities; the attention's spread
        torch.testing.assert_close(pooled, pooled_mean(topdown.encoderCNN.extract(x)))  # the CNN's, as it gives it
    feats = topdown.encoderCNN.extract(x[:2])
    ids = [[5, 6, 7, 8, 9], [5]]  # the second is padded in the batch
    both = decoder_signals(topdown, feats, True, ids)
    alone = torch.cat([decoder_signals(topdown, feats[i:i + 1], True, ids[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_onnx_and_torchscript_exports_caption_like_pytorch(tmp_path):
    vocab = Vocab(SPECIALS + [f"w{i}" for i in range(30)])
    model = _model(vocab_size=len(vocab))
    checkpoint = tmp_path / "topdown.pth.tar"
    save_checkpoint(checkpoint_state(model, vocab, preprocessing("efficientnet_lite0")), checkpoint)
    captioner = Captioner(checkpoint)
    expected = {beam: [captioner.caption(p, beam) for p in PHOTOS] for beam in (1, 3)}
    for fmt in ("onnx", "torchscript"):
        export.export(checkpoint, fmt, tmp_path / fmt)
        config = json.loads((tmp_path / fmt / "captioner.json").read_text())
        assert config["decoder"] == "topdown" and config["attention"] and config["state_batch_axes"] == [0] * 7
        runner = Runner(tmp_path / fmt)
        for beam in (1, 3):  # traced at a batch of 2; beam search runs 3 rows, greedy 1
            assert [runner.caption(p, beam) for p in PHOTOS] == expected[beam], (fmt, beam)


def test_old_checkpoints_without_the_new_field_load_as_they_were_made(tmp_path):
    vocab = Vocab(SPECIALS + [f"w{i}" for i in range(20)])
    regions = torch.randn(2, 49, 1280) * 3
    for decoder, kind in (("attention", M.AttentionDecoder), ("plain", M.RNN_decoder)):
        model = _model(vocab_size=len(vocab), decoder=decoder)
        state = checkpoint_state(model, vocab, preprocessing("efficientnet_lite0"))
        old = state["model_args"]  # as every checkpoint made before the top-down decoder: one boolean
        old["attention"] = old.pop("decoder") == "attention"
        save_checkpoint(state, tmp_path / f"{decoder}.pth.tar")
        rebuilt, _, _ = model_from_checkpoint(load_checkpoint(tmp_path / f"{decoder}.pth.tar"))  # weights_only
        assert type(rebuilt.decoderRNN) is kind and rebuilt.args.decoder == decoder
        x = regions if decoder == "attention" else regions.mean(1)
        assert generate(rebuilt.eval(), x, max_len=8, beam=3, from_features=True) == \
            generate(model, x, max_len=8, beam=3, from_features=True)
    shipped = load_checkpoint(SHIPPED_CHECKPOINT)
    assert "topdown" not in shipped["model_args"] and shipped["model_args"]["attention"]
    assert type(model_from_checkpoint(shipped)[0].decoderRNN) is M.AttentionDecoder


@pytest.mark.parametrize("flags, message", [
    (["--attention", "--decoder", "plain"], "--attention means --decoder attention, not --decoder plain"),
    (["--attention", "--decoder", "topdown"], "not --decoder topdown"),
    (["--decoder", "topdown", "--num-layers", "2"], "the topdown decoder has two LSTMs of one layer each"),
    (["--decoder", "attention", "--num-layers", "2"], "the attention decoder has one LSTM layer"),
    (["--decoder", "bottomup"], "invalid choice"),
])
def test_contradicting_decoder_flags_are_one_usage_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        image_training.parse_args(["--demo", *flags])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_attention_is_still_the_attention_decoder_and_decoder_is_explained_in_help():
    assert image_training.parse_args(["--demo", "--attention"]).decoder == "attention"
    assert image_training.parse_args(["--demo", "--attention", "--decoder", "attention"]).decoder == "attention"
    assert image_training.parse_args(["--demo"]).decoder == "plain"
    assert image_training.parse_args(["--demo", "--decoder", "topdown"]).decoder == "topdown"
    text = " ".join(image_training.get_args_parser().format_help().split())
    assert "topdown: Anderson et al.'s top-down decoder" in text and "the same as --decoder attention" in text


@pytest.mark.slow
def test_train_a_topdown_model_resume_it_and_fine_tune_it_self_critically(tmp_path, cache_dir, caplog):
    """The word loss with the attention penalty for one epoch, --resume for a second, then --scst --init-from;
    each checkpoint reloads with weights_only=True as the top-down decoder."""
    common = ("--max-images", "16", "--device", "cpu", "--embed-size", "32", "--hidden-size", "32",
              "--attention-dim", "16", "--dev-images", "2")
    first = image_training.main(train_args(tmp_path / "a", cache_dir, *common, "--epochs", "1", "--decoder",
                                           "topdown", "--attention-reg", "1"))
    assert [h["epoch"] for h in first["history"]] == [1] and math.isfinite(first["history"][0]["train_loss"])
    last = tmp_path / "a" / "ck" / "last.pth.tar"
    ckpt = load_checkpoint(last)
    assert ckpt["model_args"]["decoder"] == "topdown" and ckpt["train_args"]["decoder"] == "topdown"
    assert model_from_checkpoint(ckpt)[0].args.decoder == "topdown"
    resumed = image_training.main(train_args(tmp_path / "a", cache_dir, *common, "--epochs", "2", "--resume",
                                             str(last)))
    assert [h["epoch"] for h in resumed["history"]] == [2]
    assert load_checkpoint(last)["model_args"] == ckpt["model_args"]
    with caplog.at_level("INFO", logger="captioner"):
        tuned = image_training.main(train_args(tmp_path / "b", cache_dir, *common, "--epochs", "1", "--init-from",
                                               str(last), "--scst", "--scst-samples", "2", "--lr", "5e-5"))
    assert tuned["history"][0]["train_cider_d"] >= 0
    assert "(efficientnet_lite0 encoder, topdown decoder)" in caplog.text
    after = load_checkpoint(tmp_path / "b" / "ck" / "last.pth.tar")
    model = model_from_checkpoint(after)[0]
    assert type(model.decoderRNN) is M.TopDownDecoder and after["model_args"] == ckpt["model_args"]
    before = load_checkpoint(last)["model"]
    assert any(not torch.equal(after["model"][k], v) for k, v in before.items())  # it learned
