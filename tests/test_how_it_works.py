"""docs/how-it-works.md's table of shapes, cell by cell, against what the code computes (random weights: nothing is
downloaded)."""

import pytest
import torch

from captioner.backbones import preprocessing
from image_intial_model import CNN_RNN, SOS_IDX, ModelArgs
from tests.conftest import ROOT
from utils import model_args_from

T, V = 5, 30  # the caption's words and the vocabulary's size: numbers that no other dimension here has
# the table's columns: (encoder, decoder, hidden size)
COLUMNS = [("inception_v3", "plain", 256), ("efficientnet_lite0", "plain", 256),
           ("efficientnet_lite1", "attention", 512)]


def documented():
    """The table as {step: [cell per column]}."""
    text = (ROOT / "docs" / "how-it-works.md").read_text()
    block = text.split("<!-- shapes: checked by tests/test_how_it_works.py -->", 1)[1].split("<!-- end of shapes")[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block.strip().splitlines()]
    return {row[0]: row[1:] for row in rows[2:]}


def shape(t, per_word=False):
    """A tensor's shape as the table writes it, without its batch axis: T for the caption's words, V for the
    vocabulary."""
    names = {T: "T", T + 1: "1 + T", V: "V"}
    text = "[" + ", ".join(names.get(d, str(d)) for d in t.shape[1:]) + "]"
    return f"{text} per word" if per_word else text


@torch.no_grad()
def computed(encoder, decoder, hidden):
    """The table's column for one model, computed."""
    torch.manual_seed(0)
    model = CNN_RNN(ModelArgs(V, encoder, hidden_size=hidden, decoder=decoder), weights="random").eval()
    size = preprocessing(encoder)["crop"]
    image = torch.randn(1, 3, size, size)
    read = model.encoderCNN.extract(image)
    lstm = model.decoderRNN.lstm if decoder == "plain" else model.decoderRNN.cell  # nn.LSTM, or one LSTMCell a word
    seen = {}
    lstm.register_forward_hook(lambda m, inputs, output: seen.setdefault("io", (inputs[0], output[0])))
    tokens = torch.cat([torch.tensor([[SOS_IDX]]), torch.randint(4, V, (1, T - 1))], 1)  # [1, T]
    logits, weights = model(image, tokens, with_attention=True) if decoder != "plain" else (model(image, tokens), None)
    lstm_in, lstm_out = seen["io"]
    return {
        "photo, resized and cropped": shape(image),
        "CNN feature map": shape(model.encoderCNN.backbone.forward_features(image)),
        "what the decoder reads of it": ("regions: " if model.encoderCNN.spatial else "mean: ") + shape(read),
        "after the projection (Linear + ReLU)": shape(model.encoderCNN.project(read)),
        "LSTM input": shape(lstm_in, per_word=decoder != "plain"),
        "LSTM output": shape(lstm_out, per_word=decoder != "plain"),
        "attention weights": "none" if weights is None else shape(weights),
        "next-word scores (logits)": shape(logits),
    }


@pytest.mark.parametrize("column", range(len(COLUMNS)), ids=[c[0] for c in COLUMNS])
def test_every_shape_in_how_it_works_is_the_codes(column):
    table = documented()
    assert {step: cells[column] for step, cells in table.items()} == computed(*COLUMNS[column])


def test_how_it_works_names_the_shipped_models_shape():
    """The third column is the shipped model's shape: its encoder, decoder and hidden size."""
    shipped = model_args_from(torch.load(ROOT / "checkpoints" / "pretrained" / "model.pth",
                                             weights_only=True)["model_args"])
    assert (shipped.encoder, shipped.decoder, shipped.hidden_size) == COLUMNS[2]
    text = " ".join((ROOT / "docs" / "how-it-works.md").read_text().split())
    assert f"({shipped.vocab_size} words for the model that ships" in text
