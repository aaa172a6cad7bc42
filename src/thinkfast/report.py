"""The run report: ``thinkfast report RUN_DIR`` writes ``RUN_DIR/report/report.md`` and its PNG plots from what
the stages left in the run directory (nothing is recomputed):

* what each stage cost (seconds) and bought (its headline numbers);
* the architecture: the parent's layers against the searched child's (``architecture.png``), and the layer
  count of every model;
* every evaluated model: accuracy per mode, and prefill / decode throughput when ``eval`` timed them
  (``eval.throughput_batches``), as a table and as accuracy against decode throughput
  (``accuracy_vs_throughput.png``);
* the training curves of every stage that trained (``training_curves.png``);
* accuracy against a thinking budget, when ``eval`` swept one (``eval.budgets``; ``budget.png``).

``thinkfast run`` ends by writing it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from .artifacts import COMPLETE, CURVE, OUTPUTS, read_curve
from .rundir import atomic_write_text

__all__ = ["write_report"]

# the headline numbers of each stage's metrics.json, in the order shown
_HEADLINES = {
    "pretrain": ["parameters", "tokens", "final_loss_ema", "tokens_per_second"],
    "parent": [],
    "library": ["blocks", "trained_blocks", "mean_init_nmse", "mean_final_nmse"],
    "scores": ["blocks", "parent_lm_loss"],
    "costs": ["device", "variants"],
    "search": ["speedup", "measured_speedup", "params_fraction", "kv_fraction", "optimal"],
    "fuse": ["layers_before", "layers_after", "kl_to_unfused"],
    "distill": ["steps", "tokens", "kl_before", "kl_after", "accuracy_before", "accuracy_after"],
    "sft": ["examples", "steps", "tokens", "accuracy_on", "accuracy_off", "format_ok_on", "format_ok_off"],
    "grpo": ["prompts", "prompts_kept", "reward_first", "reward_last", "accuracy_on_before", "accuracy_on_after"],
    "rloo": ["prompts", "reward_first", "reward_last", "if_strict_on_before", "if_strict_on_after",
             "if_strict_off_before", "if_strict_off_after", "accuracy_on_before", "accuracy_on_after"],
    "reward_model": ["pairs", "held_out_accuracy_before", "held_out_accuracy_after"],
    "rpo": ["mode", "loss", "steps", "if_strict_on", "accuracy_on", "rm_score_on"],
}


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stages(run_dir: Path) -> list[tuple[str, dict]]:
    """Completed stages in the order they finished: (name, their completion marker's record)."""
    done = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        rec = _read(d / COMPLETE)
        if isinstance(rec, dict) and rec.get("stage") == d.name:
            done.append((d.name, rec))
    return sorted(done, key=lambda x: x[1].get("finished_at", ""))


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _layers(model_dir: Path) -> list[tuple[int, int]] | None:
    """Per layer (KV heads, FFN width) of a model folder: 0 for a removed sub-block, -1 for a linear one."""
    cfg = _read(model_dir / "config.json")
    if not cfg:
        return None
    if cfg.get("model_type") == "llama":
        kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        return [(kv, cfg["intermediate_size"])] * cfg["num_hidden_layers"]
    from .modeling import DeciLMConfig

    conf = DeciLMConfig.from_pretrained(str(model_dir))
    out = []
    for a, f in conf.block_specs():
        kv = a.num_kv_heads(conf.num_attention_heads) if a.kind == "gqa" else (-1 if a.kind == "linear" else 0)
        width = f.intermediate_size if f.kind == "swiglu" else (-1 if f.kind == "linear" else 0)
        out.append((kv, width))
    return out


def _describe(kv: int, width: int) -> str:
    att = "no attention" if kv == 0 else "linear attention" if kv == -1 else f"attention, {kv} KV heads"
    ffn = "no FFN" if width == 0 else "linear FFN" if width == -1 else f"FFN {width}"
    return f"{att}; {ffn}"


def _plot_architecture(parent: list, child: list, names: tuple[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    x = range(len(parent))
    for ax, i, what in ((axes[0], 0, "KV heads (-1: linear)"), (axes[1], 1, "FFN width (-1: linear)")):
        ax.bar([v - 0.2 for v in x], [p[i] for p in parent], width=0.4, label=names[0], color="tab:gray")
        ax.bar([v + 0.2 for v in x], [c[i] for c in child], width=0.4, label=names[1], color="tab:blue")
        ax.set_xlabel("layer")
        ax.set_title(what, fontsize=9)
        ax.set_xticks(list(x))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(run_dir: Path) -> dict[str, tuple[list[tuple[str, list, list]], bool]]:
    """Per training stage: its (label, steps, values) series and whether to plot them on a log scale. Pretraining
    from its log, every other stage from its ``curve.json`` (:func:`thinkfast.artifacts.read_curve`), in the order
    the stages finished."""
    out: dict[str, tuple[list, bool]] = {}
    log = run_dir / "pretrain" / "log.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("event") == "train" and "loss" in r]
        if rows:
            out["pretrain"] = ([("loss", [r["step"] for r in rows], [r.get("loss_ema", r["loss"]) for r in rows])],
                               True)
    finished = {name: i for i, (name, _) in enumerate(_stages(run_dir))}
    folders = sorted((p for p in run_dir.iterdir() if p.is_dir() and (p / CURVE).is_file()),
                     key=lambda p: (finished.get(p.name, len(finished)), p.name))
    for folder in folders:
        curve = read_curve(folder / CURVE)
        if curve is not None:
            out[folder.name] = (curve.series(), curve.log_y)
    return out


def _plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.4 * len(curves), 3.0), squeeze=False)
    for ax, (stage, (series, log_y)) in zip(axes[0], curves.items()):
        for label, x, y in series:
            pts = [(a, b) for a, b in zip(x, y) if b is not None]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], label=label, marker="." if len(pts) < 30 else None)
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best_mode(m: dict) -> tuple[str, float, float | None]:
    """The reasoning mode of an eval result (think / on) with its accuracy and headline accuracy."""
    modes = m.get("modes", {})
    mode = "on" if "on" in modes else "think" if "think" in modes else next(iter(modes), None)
    if mode is None:
        return "-", float("nan"), None
    r = modes[mode]
    return mode, r["accuracy"], next((v for k, v in r.items() if k.startswith("accuracy_")), None)


def _plot_tradeoff(rows: list[tuple[str, float, float]], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, x, y in rows:
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"decode tokens/s ({key.split('@')[1]} sequences)")
    ax.set_ylabel("accuracy, reasoning mode (headline difficulty)")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_budget(points: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, pts in points.items():
        finite = [p for p in pts if p["budget"] is not None]
        ax.plot([max(p["budget"], 0.5) for p in finite], [p["accuracy"] for p in finite], "o-", label=name)
        unlimited = next((p for p in pts if p["budget"] is None), None)
        if unlimited:
            ax.axhline(unlimited["accuracy"], ls="--", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("thinking budget, tokens (0 at 0.5; dashed: no budget)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report/report.md`` (and its plots); returns its path."""
    run_dir = Path(run_dir)
    stages = _stages(run_dir) if run_dir.is_dir() else []
    if not stages:
        raise FileNotFoundError(f"{run_dir}: no completed stage to report on (run `thinkfast run` first)")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    md = [f"# Run report: `{run_dir}`", "",
          f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from the run directory's records.", "",
          "## Stages", "", "| stage | seconds | peak MiB | what it made |", "|---|---|---|---|"]
    total = 0.0
    for name, rec in stages:
        m = rec.get("metrics", {})
        secs = m.get("stage_seconds")
        total += secs or 0.0
        keys = _HEADLINES.get(name, [])
        what = ", ".join(f"{k} {_fmt(m[k])}" for k in keys if k in m)
        peak = m.get("peak_rss_mib")
        peak = "" if peak is None else f"{peak}" + (f" (+{m['peak_rss_workers_mib']} workers)"
                                                     if m.get("peak_rss_workers_mib") else "")
        md.append(f"| {name} | {_fmt(secs)} | {peak} | {what} |")
    md += [f"| **all** | **{total:.0f}** | | |", ""]

    makers = [name for name, _ in stages if (run_dir / name / OUTPUTS["model"] / "config.json").is_file()]
    if makers:
        md += ["## Architecture", ""]
        first, searched = makers[0], next((s for s in makers if s == "search"), makers[-1])
        parent, child = _layers(run_dir / first / OUTPUTS["model"]), _layers(run_dir / searched / OUTPUTS["model"])
        if parent and child and len(parent) == len(child) and first != searched:
            _plot_architecture(parent, child, (first, searched), out / "architecture.png")
            md += [f"`{first}` (parent) against `{searched}`, layer by layer:", "",
                   "| layer | parent | child |", "|---|---|---|"]
            md += [f"| {i} | {_describe(*p)} | {_describe(*c)} |" for i, (p, c) in enumerate(zip(parent, child))]
            md += ["", "![architecture](architecture.png)", ""]
        md += ["Layers of every model: " + ", ".join(
            f"{s} {len(_layers(run_dir / s / 'model') or [])}" for s in makers), ""]

    ev = _read(run_dir / "eval" / "metrics.json") if (run_dir / "eval" / COMPLETE).is_file() else None
    results = (ev or {}).get("models", {})
    if results:
        tp = _read(run_dir / "eval" / "throughput.json") or {}
        speeds = tp.get("models", {})
        keys = [k for k in next(iter(speeds.values()), {}) if not k.startswith("x_")]
        md += ["## Models", "", "Accuracy from `eval` (reasoning mode: `on` for chat models, `think` for text ones; "
               "headline: the headline difficulty)" + (f"; throughput measured side by side on {tp.get('device')}"
                                                       if speeds else "") + ".", "",
               "| " + " | ".join(["model", "mode", "accuracy", "headline", "other mode", *keys]) + " |",
               "|---|---|---|---|---|" + "---|" * len(keys)]
        tradeoff = []
        decode_key = max((k for k in keys if k.startswith("decode")), key=lambda k: int(k.split("@")[1]),
                         default=None)
        for name, m in results.items():
            mode, acc, head = _best_mode(m)
            other = [f"{k} {v['accuracy']:.3f}" for k, v in m.get("modes", {}).items() if k != mode]
            s = speeds.get(name, {})
            cells = [name, mode, f"{acc:.3f}", _fmt(head), ", ".join(other),
                     *(f"{s[k]:,.0f} ({s['x_' + k]:.2f}x)" if k in s else "-" for k in keys)]
            md.append("| " + " | ".join(cells) + " |")
            if decode_key and decode_key in s:
                tradeoff.append((name, s[decode_key], head if head is not None else acc))
        if tradeoff:
            _plot_tradeoff(tradeoff, decode_key, out / "accuracy_vs_throughput.png")
            md += ["", "![accuracy against throughput](accuracy_vs_throughput.png)"]
        budgets = {name: m["budget"] for name, m in results.items() if m.get("budget")}
        if budgets:
            _plot_budget(budgets, out / "budget.png")
            md += ["", "## Thinking budget", "", "Accuracy with reasoning on against the thinking budget (greedy):", "",
                   "![accuracy against budget](budget.png)"]
        md.append("")

    curves = _curves(run_dir)
    if curves:
        _plot_curves(curves, out / "training_curves.png")
        md += ["## Training curves", "", "![training curves](training_curves.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
