#!/usr/bin/env python
"""One short GPU check (run it on a lent CUDA machine; it needs no network): family parity on CUDA
through the pinned-staging path (the required families; --all for every supported one), flash-attn
when it is installed, compressed layers (8bit/4bit, dequantized in the prefetch thread on CUDA)
against transformers' fake-quantized model, then a quick side-by-side benchmark. Target: under 5
minutes.

    python tools/gpu_check.py            # exits non-zero on any mismatch
    python tools/gpu_check.py --all      # every supported family (much longer)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rabbitllm import AutoModel  # noqa: E402
from rabbitllm.utils.platform import is_flash_attention_available  # noqa: E402
from tests.models.families import (  # noqa: E402
    FAMILIES,
    available_families,
    build_model,
    save_checkpoint,
)
from tests.models.test_compressed_parity import fake_quantized  # noqa: E402


def check_family(
    family: str, tmp: Path, dtype: torch.dtype, attn: str = "sdpa"
) -> tuple[bool, str]:
    ref = build_model(family, dtype=torch.float32, seed=0)
    path = tmp / family
    if not path.exists():  # one checkpoint per family, reused by every dtype and kernel
        save_checkpoint(ref, path, sharded=True)
    ref = ref.to(device="cuda", dtype=dtype)
    ids = torch.randint(3, ref.config.vocab_size - 1, (1, 24), device="cuda")
    kw = dict(
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        pad_token_id=ref.config.pad_token_id or 0,
    )
    with AutoModel.from_pretrained(
        path, device="cuda", dtype=dtype, attn_implementation=attn
    ) as model:
        with torch.no_grad():
            diff = (ref(ids).logits.float() - model(ids).logits.float()).abs().max().item()
        same = torch.equal(ref.generate(ids, **kw), model.generate(ids, **kw))
    return same and diff <= (
        1e-4 if dtype == torch.float32 else 5e-2
    ), f"max|dlogits|={diff:.2e} tokens_equal={same}"


def check_compressed(family: str, tmp: Path, compression: str) -> tuple[bool, str]:
    """fp32 compressed streaming on CUDA against transformers' fake-quantized model on CUDA (the
    CPU test suite's oracle; the tolerance is its 1e-4 relative)."""
    path = tmp / family
    if not path.exists():
        save_checkpoint(build_model(family, dtype=torch.float32, seed=0), path, sharded=True)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with AutoModel.from_pretrained(
        path, device="cuda", dtype=torch.float32, compression=compression
    ) as model:
        record = model._rabbit_streamer.weight_map.compressed.record
        fake = fake_quantized(path, record, tmp / f"{family}-{compression}-fake").to("cuda")
        ids = torch.randint(3, fake.config.vocab_size - 1, (1, 24), device="cuda")
        with torch.no_grad():
            expected, got = fake(ids).logits, model(ids).logits
        diff = (expected - got).abs().max().item()
        same = torch.equal(fake.generate(ids, **kw), model.generate(ids, **kw))
    bound = 1e-4 * max(1.0, expected.abs().max().item())
    return same and diff <= bound, f"max|dlogits|={diff:.2e} tokens_equal={same}"


def main() -> int:
    assert torch.cuda.is_available(), "run this on a CUDA machine"
    flash, why = is_flash_attention_available(torch.bfloat16)
    print("GPU:", torch.cuda.get_device_name(), "flash:", flash, why)
    families = available_families()
    if "--all" not in sys.argv[1:]:
        families = [f for f in families if FAMILIES[f].required]
    runs = [(f, dtype, "sdpa") for dtype in (torch.float32, torch.bfloat16) for f in families]
    if flash:  # the flash-attn path: half precision only
        runs += [(f, torch.bfloat16, "flash_attention_2") for f in families]
    failures = 0
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for family, dtype, attn in runs:
            try:
                ok, detail = check_family(family, Path(tmp), dtype, attn)
            except Exception as exc:  # one family's crash is a finding, not the end of the check
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            failures += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} {family:16s} {str(dtype):15s} {attn:17s} {detail}",
                flush=True,
            )
        os.environ["RABBITLLM_CACHE"] = str(Path(tmp) / "cache")
        for family in families:
            for compression in ("8bit", "4bit"):
                try:
                    ok, detail = check_compressed(family, Path(tmp), compression)
                except Exception as exc:
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {family:16s} {compression:15s} {detail}")
    print(f"parity: {failures} failure(s) in {time.time() - start:.0f}s")
    bench = [sys.executable, "-m", "tools.rabbit_bench", "--quick", "--device", "cuda"]
    subprocess.run(bench, cwd=ROOT, check=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
