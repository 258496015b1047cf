"""Several trained captioners as one: an ensemble generates each next word from the mean of its members'
next-word distributions (EnsembleDecoder), and runs a CNN they share once per image (Ensemble).
"""

import dataclasses
import math

import torch
from torch import nn

from captioner.backbones import same_weights
from image_intial_model import next_word_logits


class EnsembleDecoder(nn.Module):
    """Several decoders as one: each next word is chosen from the mean of their next-word distributions.
    Its state is the tuple of theirs; its input, the tuple of their inputs (each projects the image its own way)."""

    def __init__(self, decoders):
        super().__init__()
        self.members = nn.ModuleList(decoders)

    def start(self, feats):
        return tuple(d.start(f) for d, f in zip(self.members, feats))

    def step(self, tokens, state):
        """tokens [N] -> log of the mean next-word probabilities [N, V], and the new states."""
        logps, states = [], []
        for d, s in zip(self.members, state):
            logits, s = next_word_logits(d, tokens, s)  # each one's distribution over the words it may say
            logps.append(logits.float().log_softmax(-1))
            states.append(s)
        return torch.stack(logps).logsumexp(0) - math.log(len(logps)), tuple(states)

    def select(self, state, rows):
        return tuple(d.select(s, rows) for d, s in zip(self.members, state))


def _same_cnn(a, b):
    """Whether two encoders' CNNs give the same features: same weights, both pooled or both regions."""
    return a.spatial == b.spatial and same_weights(a.backbone.state_dict(), b.backbone.state_dict())


def cnn_once(model, x, from_features):
    """(x, from_features) for a model's generation: images become its CNN's features here, once, where it has one
    CNN (a CNN_RNN, an Ensemble whose members share it, or a runtime's frozen model of either); an ensemble whose
    CNNs differ gets the images themselves. Features (from_features) pass as they are."""
    if from_features or not getattr(model, "shared_cnn", True):
        return x, from_features
    return model.encoderCNN.extract(x), True


class Ensemble(nn.Module):
    """Several trained captioners with one vocabulary and one CNN input, generating as one (EnsembleDecoder).
    Where their CNNs are the same (frozen ImageNet weights, the usual case, and all with attention or all
    without), the CNN runs once per image."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.decoderRNN = EnsembleDecoder([m.decoderRNN for m in models])
        self.shared_cnn = all(_same_cnn(models[0].encoderCNN, m.encoderCNN) for m in models[1:])
        # What callers read from a model's args (its encoder; whether it has attention maps) holds for all: their
        # decoder where they have one, else "attention" where all attend over regions (the maps are their mean)
        kinds = {m.args.decoder for m in models}
        decoder = kinds.pop() if len(kinds) == 1 else "attention" if all(m.args.attention for m in models) else "plain"
        self.args = dataclasses.replace(models[0].args, decoder=decoder)

    @property
    def decoder_kind(self):
        """Its members' decoders, as "attention + topdown": what a user-facing line names it."""
        return " + ".join(m.decoder_kind for m in self.models)

    @property
    def generator(self):
        """The decoder that generation runs: its members' as one."""
        return self.decoderRNN

    @property
    def encoderCNN(self):
        """The CNN that turns images into the features every member projects (see shared_cnn)."""
        return self.models[0].encoderCNN

    def features(self, x, from_features=False):
        """Images, or the shared CNN's cached features -> the tuple of each member's input."""
        x, from_features = cnn_once(self, x, from_features)
        return tuple(m.features(x, from_features) for m in self.models)

    @torch.inference_mode()
    def attention_maps(self, x, captions, from_features=False):
        """The mean of the members' attention maps for each caption (attention decoders only)."""
        x, from_features = cnn_once(self, x, from_features)
        return self.mean_maps([m.attention_maps(x, captions, from_features) for m in self.models])

    @staticmethod
    def mean_maps(per_member):
        """Each member's list of maps -> their mean for each caption."""
        return [torch.stack(maps).mean(0) for maps in zip(*per_member)]

