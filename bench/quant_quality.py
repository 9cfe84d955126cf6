"""How near a quantized file's next-token distribution stays to the f32 model's, in mpillama.

    python bench/quant_quality.py F32.gguf QUANTIZED.gguf [QUANTIZED.gguf ...] [--prompt TEXT]

For each quantized file (e.g. made by llama.cpp's llama-quantize from F32.gguf), the KL divergence
KL(f32 || quantized) of the next-token distribution at the prompt's last position, with the file's
weights as mpillama keeps them by default (--weight-type auto), the same weights dequantized
(--weight-type f32: the file's own precision, no activation rounding) and requantized to Q4_0
(--weight-type q40). One rank, logits from `generate --dump-logits`; the f32 model runs with
--weight-type f32. Prints one row per file and mode, and the ratio of auto to the file's own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROMPT = ("The history of the city begins with a small settlement on the river, where traders from the "
          "north and the south met to exchange grain, salt and cloth for")


def logits(model: Path, weight_type: str, prompt: str, folder: Path) -> np.ndarray:
    """The logits of the prompt's last position (vocab,) f32."""
    out = folder / f"{model.stem}-{weight_type}.npy"
    cmd = [sys.executable, "-m", "mpillama", "generate", "--model", str(model), "--prompt", prompt, "--steps", "1",
           "--weight-type", weight_type, "--dump-logits", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return np.load(out)[0].astype(np.float64)


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q)), in nats."""
    lp = p_logits - p_logits.max()
    lp -= np.log(np.exp(lp).sum())
    lq = q_logits - q_logits.max()
    lq -= np.log(np.exp(lq).sum())
    return float((np.exp(lp) * (lp - lq)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("f32", type=Path)
    ap.add_argument("quantized", type=Path, nargs="+")
    ap.add_argument("--prompt", default=PROMPT)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ref = logits(a.f32, "f32", a.prompt, folder)
        print(f"{'file':<40} {'auto':>10} {'own (f32)':>10} {'q40':>10} {'auto/own':>9}")
        for path in a.quantized:
            got = {mode: kl(ref, logits(path, mode, a.prompt, folder)) for mode in ("auto", "f32", "q40")}
            print(f"{path.name:<40} {got['auto']:>10.3e} {got['f32']:>10.3e} {got['q40']:>10.3e} "
                  f"{got['auto'] / got['f32']:>9.2f}")


if __name__ == "__main__":
    main()
