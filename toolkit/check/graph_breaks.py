"""``python -m toolkit.check.graph_breaks``: how ``torch.compile`` sees the U-Net, as one JSON object on stdout.

``torch._dynamo.explain`` traces the training forward (the precision policy's autocast, channels_last on CUDA) and
counts graphs and graph breaks; then one compiled training step (forward, backward) proves Inductor builds and runs
it. A separate process, so the check can time it out and Dynamo's caches never leak into another path.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from toolkit.models.unet import UNet, UNetConfig
from toolkit.train.precision import Precision
from toolkit.train.runtime import RuntimeConfig, prepare_device


def explain_unet(device: torch.device, *, size: int = 256, batch: int = 2,
                 config: UNetConfig | None = None) -> dict[str, Any]:
    """Graph and graph-break counts of the U-Net's training forward, and the seconds of one compiled step."""
    prepare_device(device)
    precision = Precision.for_device("auto", device)
    memory_format = RuntimeConfig().memory_format(device)
    model = UNet(config or UNetConfig()).to(device, memory_format=memory_format).train()
    x = torch.randn(batch, model.config.in_channels, size, size, device=device).contiguous(
        memory_format=memory_format)
    with precision.autocast():
        explanation = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    begin = time.perf_counter()
    with precision.autocast():
        loss = torch.compile(model)(x).float().square().mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "break_reasons": [str(reason.reason) for reason in explanation.break_reasons],
            "compiled_step_seconds": time.perf_counter() - begin, "precision": precision.name, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    print(json.dumps(explain_unet(torch.device(args.device), size=args.size)))


if __name__ == "__main__":
    main()
