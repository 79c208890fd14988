"""Linear probe: can the answer be read off the frozen model's hidden states, per family?

    PYTHONPATH=. .venv/bin/python bench/linear_probe.py --model artifacts/base \
        --data work/default/data/bench --cache work/default/prefix-cache --layer 26 \
        --out docs/probe_default.json

Reads the hidden states entering decoder layer `--layer` that fine-tuning cached for the
`--train` and `--eval` splits (training.stages.prefix.CachedPrefix; run a fine-tuning with LoRA from
that layer first, e.g. `quaver train --config configs/default-adapt.yaml`). Per family it fits
a multinomial logistic regression (L-BFGS, L2) from two features to the answer *text* (not the
letter) on `--train` and reports its accuracy on `--eval`:
  audio  the means of the audio-token states over the four quarters of the clip, (4 * d,)
  last   the state of the last prompt token, where the answer letter is predicted, (d,)
Accuracy well above chance says the information is present and linearly readable at that
layer, so a failure to answer is the read-out's (which letter carries it), not the hearing's.
Where the benchmark has control items, one more probe per feature tells them from answerable
items (all families together): its AUROC on `--eval` ("controls"), the ceiling for a score that
reads "this audio holds no answer" off these states.
Features are standardised with the train split's statistics. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from app.modeling import load_checkpoint
from training.stages.batches import prepare_split
from training.stages.prefix import prefix_cache_key

QUARTERS = 4


def features(loaded, model_dir: Path, data: Path, cache: Path, split: str, layer: int):
    """(X_audio (n, 4d), X_last (n, d), answer texts (n,), families (n,)) for one split."""
    path = cache / f"{prefix_cache_key(model_dir, data, split, layer)}.pt"
    if not path.exists():
        raise SystemExit(f"no cached states for {split} at layer {layer}: {path} (see docstring)")
    rows = torch.load(path, weights_only=True)
    examples = prepare_split(loaded, data, split, progress=False)
    audio_id = int(loaded.model.config.audio_token_id)
    xa, xl, y, fam = [], [], [], []
    for ex, h in zip(examples, rows, strict=True):  # h: (T, d) states of one prompt
        pos = (ex.prepared.prompt.ids == audio_id).nonzero().flatten()
        a = h[pos].float()
        n = len(a)
        xa.append(
            torch.cat(
                [a[i * n // QUARTERS : (i + 1) * n // QUARTERS].mean(0) for i in range(QUARTERS)]
            ).numpy()
        )
        xl.append(h[-1].float().numpy())
        y.append(ex.item.answer)
        fam.append(ex.item.family)
    return np.stack(xa), np.stack(xl), np.array(y), np.array(fam)


def fit_probe(x_tr, y_tr, x_ev, l2: float) -> tuple[list, np.ndarray]:
    """(classes, (n_ev, classes) probabilities) of an L2 multinomial logistic regression fitted
    on (x_tr, y_tr) and applied to x_ev."""
    classes = sorted(set(y_tr))
    index = {c: i for i, c in enumerate(classes)}
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt = torch.tensor((x_tr - mu) / sd, dtype=torch.float32)
    yt = torch.tensor([index[c] for c in y_tr])
    lin = torch.nn.Linear(xt.shape[1], len(classes))
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        probs = lin(torch.tensor((x_ev - mu) / sd, dtype=torch.float32)).softmax(1).numpy()
    return classes, probs


def fit_and_score(x_tr, y_tr, x_ev, y_ev, l2: float) -> float:
    """Accuracy on (x_ev, y_ev) of an L2 multinomial logistic regression fitted on train."""
    classes, probs = fit_probe(x_tr, y_tr, x_ev, l2)
    return float((np.array(classes)[probs.argmax(1)] == y_ev).mean())


def control_auroc_of_probe(x_tr, control_tr, x_ev, control_ev, l2: float) -> float:
    """AUROC on the eval split of a probe fitted to tell control items (audio that holds no
    answer) from answerable ones: how well the states themselves separate them."""
    from training.eval.metrics import control_auroc

    label = np.where(control_tr, "control", "answerable")
    classes, probs = fit_probe(x_tr, label, x_ev, l2)
    return control_auroc(probs[:, classes.index("answerable")], control_ev)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="base checkpoint the cache is of")
    ap.add_argument("--data", type=Path, required=True, help="benchmark directory")
    ap.add_argument("--cache", type=Path, required=True, help="prefix-cache folder")
    ap.add_argument("--layer", type=int, required=True, help="first LoRA layer of the cache")
    ap.add_argument("--train", default="pretrain", help="split the probes are fitted on")
    ap.add_argument(
        "--eval",
        default="calib",
        help="split they are scored on: calib to decide anything; a test split only as a "
        "diagnostic after every decision is made",
    )
    ap.add_argument("--l2", type=float, default=1e-2, help="L2 penalty on the probe weights")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_checkpoint(args.model)
    tr = features(loaded, args.model, args.data, args.cache, args.train, args.layer)
    ev = features(loaded, args.model, args.data, args.cache, args.eval, args.layer)
    families = {}
    for fam in sorted(set(tr[3])):
        m, me = tr[3] == fam, ev[3] == fam
        families[fam] = {
            "n_train": int(m.sum()),
            "n_eval": int(me.sum()),
            # a probe that ignores the audio: the most frequent answer text of the train split
            "majority": float((ev[2][me] == max(set(tr[2][m]), key=list(tr[2][m]).count)).mean()),
            "audio": fit_and_score(tr[0][m], tr[2][m], ev[0][me], ev[2][me], args.l2),
            "last": fit_and_score(tr[1][m], tr[2][m], ev[1][me], ev[2][me], args.l2),
        }
    ctrl_tr, ctrl_ev = tr[3] == "control", ev[3] == "control"
    controls = None
    if ctrl_tr.any() and ctrl_ev.any():  # the benchmark has control items
        controls = {
            "n_train": int(ctrl_tr.sum()),
            "n_eval": int(ctrl_ev.sum()),
            "audio_auroc": control_auroc_of_probe(tr[0], ctrl_tr, ev[0], ctrl_ev, args.l2),
            "last_auroc": control_auroc_of_probe(tr[1], ctrl_tr, ev[1], ctrl_ev, args.l2),
        }
    out = {
        "model": str(args.model),
        "layer": args.layer,
        "train": args.train,
        "eval": args.eval,
        "families": families,
        "controls": controls,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
