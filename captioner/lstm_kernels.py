"""How the decoders run over a caption, fast: the plain decoder's nn.LSTM on PyTorch's own kernel where its fast
ones (cuDNN, oneDNN) cannot do what training asks of them (`lstm_kernel`), and one word at a time as cells
(`lstm_step`); the region decoders' pass over a padded batch, each caption stopping at its padding
(`shrinking_pass`, `output_where_read`). The model reads the same with either.
"""

import contextlib
import warnings

import torch


@contextlib.contextmanager
def lstm_kernel(x, training):
    """Around an nn.LSTM's forward over x, in a module whose training mode is `training`.

    cuDNN's LSTM has no backward in eval mode, which self-critical training uses (it learns with dropout off):
    there, PyTorch's own kernel, which has one. Under bf16 autocast on a CPU without bf16 instructions (AVX2
    only), oneDNN's LSTM has no kernel ("could not create a primitive descriptor"): there, PyTorch's own LSTM,
    which runs it in fp32."""
    with torch.backends.cudnn.flags(enabled=training or not torch.is_grad_enabled()):
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with warnings.catch_warnings():  # setting the oneDNN flags warns about Intel GPUs: no news here
                warnings.simplefilter("ignore", UserWarning)
                with torch.backends.mkldnn.flags(enabled=False):
                    yield
        else:
            yield


def lstm_step(lstm, x, state):
    """One time step of an nn.LSTM: x [N, in], state (h, c) each [L, N, H] -> (the top layer's output [N, H], the
    new state). As LSTM cells with the nn.LSTM's own weights: for a single step this is 2.5x faster on a CPU than
    calling nn.LSTM, and generation is nothing but single steps. (No inter-layer dropout: generation runs in eval
    mode.)"""
    (h, c), hs, cs = state, [], []
    for i in range(lstm.num_layers):
        weights = [getattr(lstm, f"{w}_l{i}") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        x, c_i = torch.lstm_cell(x, (h[i], c[i]), *weights)
        hs.append(x)
        cs.append(c_i)
    return x, (torch.stack(hs), torch.stack(cs))


def shrinking_pass(start, advance, regions, emb, read):
    """A region decoder's word-by-word pass over a padded batch: regions [N, R, E], the words' embeddings
    emb [N, T, E], read [N, T] (False at padding) -> (the outputs h [N, T, H], the attention weights
    [N, T, R], both zero past each caption's end; whether any caption ended early, i.e. read has a False). The
    rows go longest first and the batch shrinks as captions end: on Flickr8k's batches, half the work of running
    every row to the longest caption."""
    n, steps = read.shape
    lengths = read.sum(1)  # [N]
    order = lengths.argsort(descending=True, stable=True)
    running = (lengths.unsqueeze(1) > torch.arange(steps, device=read.device)).sum(0).tolist()  # [T]
    state, emb, outs, weights = start(regions[order]), emb[order], [], []
    for t, m in enumerate(running):
        state = tuple(s[:m] for s in state)  # the captions still going: a prefix, longest first
        h, state, w = advance(emb[:m, t], state)  # h [m, H], w [m, R]
        outs.append(h if m == n else torch.nn.functional.pad(h, (0, 0, 0, n - m)))  # [N, H]
        weights.append(w if m == n else torch.nn.functional.pad(w, (0, 0, 0, n - m)))  # [N, R]
    unsort = order.argsort()
    return torch.stack(outs, 1)[unsort], torch.stack(weights, 1)[unsort], running[-1] < n  # [N, T, H], [N, T, R]


def output_where_read(linear, hidden, read, padded):
    """linear(hidden) [N, T, V] where read [N, T] is True, zero elsewhere: the output layer only where a word
    is read (with Flickr8k's batches, half the positions). padded: whether read has a False (shrinking_pass says,
    without another wait for the device)."""
    if not padded:
        return linear(hidden)
    return hidden.new_zeros(*read.shape, linear.out_features).index_put((read,), linear(hidden[read]))
