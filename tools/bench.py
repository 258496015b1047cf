"""Measure how fast this machine extracts features, trains and captions; print what was measured.

    python tools/bench.py --quick                   # CPU: a few minutes
    python tools/bench.py --data flickr8k --json    # real Flickr8k images and captions; JSON on stdout
    python tools/bench.py --encoder inception_v3 --no-pretrained --attention   # a GPU box with no network
    python tools/bench.py --serve                   # serve.py under 1, 8 and 32 concurrent clients, batching on and off
    python tools/bench.py --serve --serve-workers 2 --threads 1   # the same with two server processes of one thread
    python tools/bench.py --web                     # the web export in headless Chromium beside the Python runner
    python tools/bench.py --describe                # a whole description beside a caption and the OCR library alone

Each pipeline figure comes with its ceiling, measured in the same run, so a ratio says where the time goes:
  loader                = JPEG files decoded and resized by the loader alone, no model, --workers workers
                          (images/s; on CUDA plain JPEGs are decoded on the GPU): the most a pass over files can do
  feature_efficiency    = feature pass over JPEG files  / encoder forward on in-memory tensors (images/s)
  train_efficiency      = training epoch from the cache / decoder forward+backward on in-memory batches (captions/s)
  store_speedup         = images/s read from the image store / decoded from JPEG files and resized to the
                          training size, in one process (per core): what decoding once saves each epoch
  caption_latency_ratio = captioning one photo file at beam 3 / the encoder's forward on one image tensor
  finetune_loader / finetune_bare = a fine-tune epoch's two ceilings (images/s): the image store read with
                          random crops and colour jitter on the device, no model; the CNN + decoder training
                          step on batches already on the device
--serve measures the captioning service instead (bench_serve.py): its photos/s and p50/p99 latency against the
same model's in-process batched captioning rate (decoding included), its ceiling.
Without --data, Flickr8k-shaped JPEGs (500x375) with five made-up captions each are generated in a temporary
folder. The frozen-encoder epoch runs over 6,000 images x 5 captions (1,200 with --quick, scaled) whose cached
features are random tensors of the model's feature shape (an epoch's cost does not depend on their values).
"""

import sys
from pathlib import Path

# ruff: noqa: E402 (the imports below need the path first)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's root: its commands and captioner/

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from captioner.backbones import ENCODERS, EncoderWeightsError
from captioner.batches import default_workers
from captioner.files import DataError
from captioner.runtimes import RUNTIME_CHOICES, RUNTIME_HELP, run_frozen
from image_loader import Flickr8k
from tools.bench_describe import describe_bench, report_describe
from tools.bench_pipeline import Bench, make_jpegs, peak_memory_mb
from tools.bench_serve import report_serve, serve_bench
from utils import PRECISIONS, HelpFormatter, autocast_dtype, pick_device, positive, tune_for

# per size of run: JPEGs generated, feature pass images, frozen epoch images, fine-tune batches, timing repeats
SIZES = {"full": (2000, 2000, 6000, 20, 20), "quick": (240, 200, 1200, 3, 5), "smoke": (24, 16, 64, 1, 1)}


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark feature extraction, training and captioning.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data", help="a Flickr8k folder to read images and captions from (default: generated JPEGs)")
    p.add_argument("--encoder", choices=sorted(ENCODERS), default="efficientnet_lite0", help="CNN encoder")
    p.add_argument("--no-pretrained", action="store_true",
                   help="random CNN weights: the same speed, no download (Inception-v3 on a machine with no network)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast dtype, as in training")
    p.add_argument("--workers", type=positive(int),
                   help="loader worker processes (default: the cores this process may use, at most 16)")
    p.add_argument("--quick", action="store_true", help="fewer images and batches: a CPU run of a few minutes")
    p.add_argument("--smoke", action="store_true",
                   help="a handful of images: checks that every stage runs (the test suite's); its figures mean little")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--checkpoint", help="a trained checkpoint to time (default: a new decoder on the pretrained "
                                        "encoder; untrained, it writes all --max-len words of every caption)")
    p.add_argument("--attention", action="store_true",
                   help="time the attention decoder (hidden 512 unless --hidden-size says otherwise), the "
                        "README's best recipe")
    p.add_argument("--batch-size", type=positive(int), default=32, help="images per training batch, as in training")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default="auto", help=RUNTIME_HELP)
    p.add_argument("--no-compile", action="store_true",
                   help="leave out torch.compile's ceiling (it compiles for about a minute a shape on a small CPU)")
    p.add_argument("--embed-size", type=positive(int), default=256, help="decoder shape, as in training")
    p.add_argument("--hidden-size", type=positive(int), help="decoder shape (default 256; 512 with --attention)")
    p.add_argument("--describe", action="store_true",
                   help="time a whole description per photo file beside the caption alone and the rapidocr "
                        "library's own call (--checkpoint default: the one inference.py picks; photos with text made "
                        "by text_scenes.py, photos without from --data, else the bundled sample), then two hostile "
                        "photos")
    p.add_argument("--web", action="store_true",
                   help="benchmark the web export instead (bench_web.py): headless Chromium, WebAssembly, beside "
                        "the Python runner on 20 sample photos (--checkpoint: the model exported)")
    p.add_argument("--serve", action="store_true",
                   help="benchmark serve.py instead: photos/s and p50/p99 latency at --clients concurrent clients, "
                        "batching on (--max-batch) and off, against the in-process batched rate (--checkpoint "
                        "default: the one serve.py picks; photos: --data's, else the bundled sample's)")
    p.add_argument("--clients", type=positive(int), nargs="+", default=[1, 8, 32],
                   help="--serve: the numbers of concurrent clients to measure")
    p.add_argument("--requests", type=positive(int),
                   help="--serve: requests per measurement (default: 4 per client, at least 32; 2 per client "
                        "with --smoke)")
    p.add_argument("--max-batch", type=positive(int), default=8,
                   help="--serve: the server's --max-batch with batching on, and the in-process ceiling's batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="--serve: the server's --max-wait-ms")
    p.add_argument("--threads", type=positive(int),
                   help="--serve: PyTorch threads of the server and of the in-process ceiling (default: the cores)")
    p.add_argument("--serve-workers", type=positive(int), default=1,
                   help="--serve: the server's --workers (processes, each with its model and --threads threads)")
    return p


def size_of_run(args):
    return SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]


def run(args, data_dir, cache_dir):
    device = pick_device(args.device)
    tune_for(device)
    args.workers = args.workers or default_workers()
    data = Flickr8k.load(data_dir)
    bench = Bench(args, device, data)
    _, n_feature, n_frozen, n_finetune, repeat = size_of_run(args)
    n_feature = min(len(bench.names), n_feature)
    bench.frozen, runtime = run_frozen(bench.model, bench.preset, args.runtime, cache_dir, device, decoder=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    r = {"device": name, "encoder": args.encoder, "decoder": bench.model.decoder_kind,
         "hidden_size": bench.model.args.hidden_size, "precision": str(bench.dtype or "fp32").replace("torch.", ""),
         "decoder_precision": str(autocast_dtype(device, bench.decoder_precision) or "fp32").replace("torch.", ""),
         "workers": args.workers, "data": f"Flickr8k at {args.data}" if args.data else "generated JPEGs",
         "runtime": runtime}
    if device.type == "cpu":  # the CPU's real limit: the same CNN under each runtime, in this run
        r["ceilings"], r["compile_s"] = bench.ceilings(repeat, min(64, n_feature), not (args.smoke or args.no_compile),
                                                       cache_dir)
    # in batches as the feature pass makes them (64, or fewer when it has fewer images)
    r["encoder_forward_images_per_s"] = bench.encoder_forward(repeat, batch=min(64, n_feature))
    r["loader_images_per_s"], r["loader_warm_images_per_s"], r["loader_first_batch_s"] = bench.loader(n_feature)
    r["feature_pass_images_per_s"] = bench.feature_pass(n_feature)
    r["feature_pass_images"] = n_feature
    r["feature_efficiency"] = r["feature_pass_images_per_s"] / r["encoder_forward_images_per_s"]
    # captioning first, from the model as loaded: the stages after it train the model
    greedy, beam3, encode, words = bench.caption_latency(repeat)
    r.update(caption_greedy_s=greedy, caption_beam3_s=beam3, encoder_one_image_s=encode, caption_words=words,
             checkpoint=args.checkpoint, caption_latency_ratio=beam3 / encode,
             packed_decoder=bench.frozen.generator is not bench.model.decoderRNN)
    r["frozen_measured_images"] = n_frozen
    seconds, rate, bare = bench.frozen_epoch(n_frozen)
    r.update(frozen_epoch_s=seconds, frozen_epoch_captions_per_s=rate, decoder_bare_captions_per_s=bare,
             train_efficiency=rate / bare)
    store, build, rates = bench.image_store(bench.names[:n_finetune * args.batch_size], cache_dir)
    r.update(store_build_images_per_s=build, store_read_images_per_s=rates["store"],
             jpeg_read_images_per_s=rates["jpeg"], store_speedup=rates["store"] / rates["jpeg"])
    (r["finetune_epoch_s"], r["finetune_measured_images"], r["finetune_loader_images_per_s"],
     r["finetune_bare_images_per_s"]) = bench.finetune_epoch(store, n_finetune)
    r["peak_memory_mb"] = peak_memory_mb(device)
    if "ceilings" in r:
        r["feature_pass_of_onnx"] = r["feature_pass_images_per_s"] / r["ceilings"]["onnx"][0]
        r["caption_beam3_per_onnx_image"] = beam3 / r["ceilings"]["onnx"][1]
    return r


def report(r):
    print(f"device {r['device']}, encoder {r['encoder']}, {r['decoder']} decoder (hidden {r['hidden_size']}), "
          f"{r['precision']} (the decoder on cached features: {r['decoder_precision']}), {r['workers']} loader "
          f"workers, data: {r['data']}")
    print(f"loader alone      {r['loader_images_per_s']:8.1f} images/s decoded and resized from JPEG files, "
          f"{r['loader_warm_images_per_s']:.1f} once its workers run; first batch after "
          f"{r['loader_first_batch_s']:.2f} s")
    print(f"feature pass      {r['feature_pass_images_per_s']:8.1f} images/s over {r['feature_pass_images']} JPEGs; "
          f"bare encoder {r['encoder_forward_images_per_s']:.1f} images/s; efficiency {r['feature_efficiency']:.0%}")
    print(f"frozen epoch      {r['frozen_epoch_s']:8.2f} s for 6,000 images / 30,000 captions "
          f"(measured on {r['frozen_measured_images']:,} images, {r['frozen_epoch_captions_per_s']:.0f} "
          "captions/s); bare decoder step "
          f"{r['decoder_bare_captions_per_s']:.0f} captions/s; efficiency {r['train_efficiency']:.0%}")
    print(f"image store       built at {r['store_build_images_per_s']:.1f} images/s; one process reads "
          f"{r['store_read_images_per_s']:.1f} images/s from it against {r['jpeg_read_images_per_s']:.1f} from "
          f"JPEG files (x{r['store_speedup']:.1f})")
    print(f"fine-tune epoch   {r['finetune_epoch_s']:8.1f} s for 6,000 images from the image store, loader "
          f"workers running (measured on {r['finetune_measured_images']} images, scaled); loader alone "
          f"{r['finetune_loader_images_per_s']:.0f} images/s, bare CNN + decoder step "
          f"{r['finetune_bare_images_per_s']:.0f} images/s")
    print(f"caption one photo {r['caption_greedy_s'] * 1000:8.1f} ms greedy, "
          f"{r['caption_beam3_s'] * 1000:.1f} ms beam 3; encoder forward alone "
          f"{r['encoder_one_image_s'] * 1000:.1f} ms; ratio {r['caption_latency_ratio']:.2f} "
          f"({r['caption_words']} words, {'trained' if r['checkpoint'] else 'untrained'} decoder"
          f"{', prepacked fp16 weights' if r['packed_decoder'] else ''})")
    if "ceilings" in r:
        report_ceilings(r)
    print(f"peak memory       {r['peak_memory_mb']:8.0f} MiB")


def report_ceilings(r):
    c = r["ceilings"]
    compiled = f" (torch.compile: {r['compile_s']:.0f} s to compile both shapes)" if r["compile_s"] else \
        " (torch.compile not measured)"
    print(f"CNN ceilings      the same CNN's forward on tensors{compiled}; the tool ran it on {r['runtime']}:")
    for name, (batched, one) in c.items():
        print(f"  {name:<15} {batched:8.1f} images/s batched, {one * 1000:.1f} ms one image")
    print(f"  feature pass = {r['feature_pass_of_onnx']:.0%} of ONNX Runtime's batched forward; caption at beam 3 "
          f"= {r['caption_beam3_per_onnx_image']:.2f}x its one-image forward")


def main(args):
    with tempfile.TemporaryDirectory() as tmp:  # the image store goes here, and generated JPEGs
        data = args.data or make_jpegs(Path(tmp) / "data", size_of_run(args)[0])
        return run(args, data, Path(tmp) / "cache")


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.web:
        # its own command (a browser, npm): run as one, with the flags it shares, its output and status as they come
        return subprocess.run([sys.executable, str(Path(__file__).with_name("bench_web.py")),
                               *(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                               *(["--json"] if args.json else [])]).returncode
    try:
        r = serve_bench(args) if args.serve else describe_bench(args) if args.describe else main(args)
    except (DataError, EncoderWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
    else:
        (report_serve if args.serve else report_describe if args.describe else report)(r)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
