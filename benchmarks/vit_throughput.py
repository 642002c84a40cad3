"""ViT-S/14 (DINOv2 architecture) against ResNet-50 and EfficientNet-Lite0: images/s of describing with GeM.

Each model (random weights: speed does not depend on them) describes a batch of `--batch-size` random images
of `size x size` px, for each `--sizes` (224 and 448 by default: multiples of 14, so the ViT resizes nothing),
through `RetrievalNetwork(Backbone(...), {"gem": GeM()})` under `torch.inference_mode()` on the CPU: the
same forward pass as `hetretrieval-eval`. The three models of one size run interleaved (ViT, ResNet, Lite0,
ViT, ...) `--repeats` times after one untimed warm-up round; min and median wall time and images/s are
printed, and the ratios of the ViT's rate to each CNN's (of mins and of medians).

    .venv/bin/python benchmarks/vit_throughput.py [--threads 2] [--repeats 5] [--batch-size 4] [--sizes 224 448]
"""

from __future__ import annotations

import argparse

import torch
from _interleave import interleave, print_ratio, print_times

from hetretrieval.models.backbones import Backbone
from hetretrieval.models.network import RetrievalNetwork
from hetretrieval.models.pooling.heads import GeM

MODELS = {"ViT-S/14": "vit_small_patch14_dinov2", "ResNet-50": "resnet50",
          "EfficientNet-Lite0": "tf_efficientnet_lite0"}


def describe(network: RetrievalNetwork, images: torch.Tensor):
    """One timed run: the network's GeM descriptors of the batch."""
    def run() -> None:
        with torch.inference_mode():
            network(images)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    networks = {label: RetrievalNetwork(Backbone(name, pretrained=False), {"gem": GeM()}).eval()
                for label, name in MODELS.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, random weights, "
          f"{args.repeats} interleaved repeats (+1 warm-up)")
    for size in args.sizes:
        images = torch.rand(args.batch_size, 3, size, size)

        timings = interleave({label: describe(network, images) for label, network in networks.items()},
                             args.repeats)
        print(f"\n{size} x {size} px")
        for label, seconds in timings.items():
            print_times(label, seconds, args.batch_size, width=40)
        for cnn in ("ResNet-50", "EfficientNet-Lite0"):
            print_ratio(f"ViT-S/14 / {cnn} images/s", timings["ViT-S/14"], timings[cnn], invert=True, width=40)


if __name__ == "__main__":
    main()
