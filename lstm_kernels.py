"""How the plain decoder's nn.LSTM runs: over a whole caption, on PyTorch's own kernel where its fast ones (cuDNN,
oneDNN) cannot do what training asks of them (`lstm_kernel`); one word at a time, as cells (`lstm_step`). The
model reads the same with either.
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
