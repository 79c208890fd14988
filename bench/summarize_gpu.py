"""Turn the GPU check's JSON files into a markdown table of ratios to the merged pass at K=8.

python bench/summarize_gpu.py gpu-results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    d = Path(folder)
    rows = [
        "| shape | device | merged ms | seq K=8 | ours all K=8 | ours top8 K=8 | ours top4 K=8 "
        "| ref batch_enc1 | ref tail8 | ref tail4 | ref LoRA-separate K=1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tag in ("7b", "3b"):
        ours_p, ref_p = d / f"ours_{tag}.json", d / f"reference_{tag}.json"
        if not ours_p.exists():
            continue
        o = json.loads(ours_p.read_text())
        r8 = o["ratios_to_merged"].get("K8", {})
        ref = json.loads(ref_p.read_text()) if ref_p.exists() else None
        if ref:
            m = ref["merged_ms"]
            k8 = ref["K8"]
            refs = [
                f"{k8['batch_enc1_ms'] / m:.2f}x",
                f"{k8['tail8_ms'] / m:.2f}x",
                f"{k8['tail4_ms'] / m:.2f}x",
                f"{ref['single_ms'] / m:.2f}x",
            ]
        else:
            refs = ["-"] * 4
        rows.append(
            f"| {o['model']} | {o['device']} | {o['merged_ms']:.1f} | {r8.get('seq')}x | "
            f"{r8.get('all')}x | {r8.get('top8')}x | {r8.get('top4')}x | " + " | ".join(refs) + " |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-results")
