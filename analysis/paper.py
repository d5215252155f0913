"""The paper's published numbers, as data, with their source.

Source: Chen Wu, Prince Zizhuang Wang, William Yang Wang. "On the Encoder-Decoder Incompatibility
in Variational Text Modeling and Beyond". ACL 2020, pp. 3449-3464 (arXiv:2004.09189).
Transcribed by hand: every number below was read off Tables 1, 2, 3, 4 and 8 of the paper.

Units and estimators, as in the paper (Appendix D/E):
  nll, kl   nats per sentence; NLL by importance sampling with N = 100 on the TEST split (GRU-LM,
            GRU encoder-decoder: exact NLL); KL Monte Carlo over the same samples
  ppl       exp(total NLL / (words + <eos>))
  mi_loo    MI with the leave-one-out aggregate posterior (M = 512 other sentences, N = 100)
  bleu1/2   reconstruction BLEU in percent, 100 * BP * p_n (multi-bleu, not cumulative)
  dist1/2   percent of distinct n-grams (Table 8: one prior response per test post)
A value of ``None`` is a dash in the paper, or a cell the transcribed copy does not show legibly.

Our presets are the cvae_core names (``cvae presets``); the coupled rows of Table 1/2 use each
coupled preset's own λ_m (e.g. 0.1 for coupled-vae, 7.5 for coupled-vmf-vae on PTB).
The Table 8 rows use cvae_core's dialogue presets (seq2seq, cvae, coupled-cvae).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SOURCE = ("Wu, Wang & Wang (2020), On the Encoder-Decoder Incompatibility in Variational Text Modeling "
          "and Beyond, ACL 2020 (arXiv:2004.09189)")
PAPER_SPLIT = "test"
DATASET_LABELS = {"ptb": "PTB", "yelp13": "Yelp", "yahoo": "Yahoo", "switchboard": "Switchboard", "synthetic": "Synthetic"}


@dataclass(frozen=True)
class PaperRow:
    """One printed row of one table, for one dataset."""
    table: str                      # "1", "2", "3", "4", "8"
    label: str                      # the row label as printed
    dataset: str                    # ptb | yelp13 | yahoo | switchboard
    preset: str | None              # our preset (None: no counterpart in cvae_core)
    values: dict[str, float | None]  # our metric names: nll, kl, ppl, mi_loo, bleu1, bleu2, dist1, dist2
    coupling: dict[str, Any] | None = None  # distance / lambda_m / lambda_r when the table fixes them
    block: str = ""                 # rows compared with each other (bold per block in the paper)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Table 1: language modelling. label -> (preset, {dataset: (NLL, KL, PPL)})
_T1_DATASETS = ("ptb", "yelp13", "yahoo")
_TABLE1: dict[str, tuple[str | None, tuple]] = {
    "GRU-LM": ("lm", ((105.8, None, 125.3), (196.3, None, 57.3), (347.9, None, 78.0))),
    "VAE": ("vae", ((103.6, 8.6, 112.9), (193.7, 7.2, 54.3), (344.5, 12.4, 74.7))),
    "Coupled-VAE": ("coupled-vae", ((103.1, 9.5, 110.5), (191.2, 8.0, 51.6), (342.4, 12.8, 72.8))),
    "β(0.8)-VAE": ("beta-vae", ((103.8, 11.0, 113.9), (193.8, 10.2, 54.5), (344.9, 16.1, 75.1))),
    "Coupled-β(0.8)-VAE": ("coupled-beta-vae", ((103.3, 12.1, 111.5), (191.5, 12.2, 51.9), (342.8, 17.0, 73.2))),
    "β(1.2)-VAE": ("beta1.2-vae", ((103.7, 7.8, 113.3), (193.7, 6.0, 54.3), (345.3, 10.5, 75.5))),
    "Coupled-β(1.2)-VAE": ("coupled-beta1.2-vae", ((102.9, 8.6, 109.6), (191.2, 6.9, 51.6), (342.3, 11.3, 72.7))),
    "vMF-VAE": ("vmf-vae", ((103.6, 2.0, 113.2), (195.4, 0.0, 56.3), (344.5, 2.5, 74.7))),
    "Coupled-vMF-VAE": ("coupled-vmf-vae", ((103.0, 3.0, 110.1), (191.2, 2.8, 51.6), (342.2, 4.0, 72.5))),
    "CNN-VAE": ("cnn-vae", ((118.5, 29.6, 222.6), (194.2, 12.8, 54.8), (344.3, 19.7, 74.5))),
    "Coupled-CNN-VAE": ("coupled-cnn-vae", ((118.2, 30.2, 219.7), (193.9, 13.7, 54.6), (343.3, 22.4, 73.6))),
    "WAE": ("wae", ((103.7, 11.0, 113.3), (193.7, 10.7, 54.3), (344.7, 16.6, 74.9))),
    "Coupled-WAE": ("coupled-wae", ((103.2, 12.5, 110.9), (191.3, 12.5, 51.7), (343.3, 18.2, 73.6))),
    "VAE-NF": ("vae-nf", ((103.3, 5.5, 111.3), (193.9, 5.3, 54.5), (344.3, 8.1, 74.5))),
    "Coupled-VAE-NF": ("coupled-vae-nf", ((102.6, 5.7, 108.1), (191.8, 5.6, 52.2), (342.6, 8.8, 73.0))),
    "WAE-NF": ("wae-nf", ((103.4, 6.7, 111.9), (194.1, 7.0, 54.7), (344.3, 10.6, 74.5))),
    "Coupled-WAE-NF": ("coupled-wae-nf", ((102.7, 7.4, 108.4), (192.1, 7.4, 52.5), (342.7, 11.0, 73.1))),
    "CycAnn-VAE": ("cycann-vae", ((104.2, 1.6, 116.3), (192.5, 1.2, 53.0), (345.4, 3.9, 75.5))),
    "Coupled-CycAnn-VAE": ("coupled-cycann-vae", ((103.7, 2.4, 113.3), (190.8, 2.0, 51.1), (342.4, 4.4, 72.7))),
    "PreFB-VAE": ("prefb-vae", ((103.4, 14.6, 111.9), (190.4, 14.1, 50.7), (341.4, 17.6, 71.8))),
    "Coupled-PreFB-VAE": ("coupled-prefb-vae", ((103.3, 15.6, 111.4), (189.9, 14.4, 50.3), (341.3, 17.9, 71.7))),
    "SA-VAE": (None, ((100.7, 7.7, 98.7), (183.5, 3.8, 44.0), (327.5, 7.2, 60.4))),
    "Lagging-VAE": ("lagging-vae", ((98.8, 6.0, 90.7), (182.5, 1.2, 43.1), (326.7, 6.0, 59.7))),
    "Coupled-Lagging-VAE": ("coupled-lagging-vae", ((98.7, 11.0, 90.4), (182.3, 3.8, 42.9), (326.2, 7.4, 59.3))),
}
_T1_NOTES = {
    "GRU-LM": "exact NLL",
    "SA-VAE": "authors' modified open-source implementation (other setup); Yahoo value previously reported",
    "Lagging-VAE": "authors' modified open-source implementation (other setup and evaluation)",
    "Coupled-Lagging-VAE": "authors' modified open-source implementation (other setup and evaluation)",
}

# Table 2: MI and reconstruction. label -> {dataset: (MI, BLEU-1, BLEU-2)}
_TABLE2: dict[str, tuple] = {
    "VAE": ((10.48, 23.2, 4.4), (8.28, 28.7, 5.3), (15.43, 21.2, 3.6)),
    "Coupled-VAE": ((11.99, 23.4, 4.5), (9.65, 30.4, 5.8), (16.44, 23.1, 4.1)),
    "β(0.8)-VAE": ((15.43, 24.5, 4.9), (13.52, 30.6, 6.0), (24.16, 24.0, 4.3)),
    "Coupled-β(0.8)-VAE": ((18.13, 24.3, 4.8), (17.69, 32.6, 6.6), (28.03, 26.4, 4.9)),
    "β(1.2)-VAE": ((9.16, 22.8, 4.3), (6.60, 28.0, 5.0), (11.83, 18.2, 2.9)),
    "Coupled-β(1.2)-VAE": ((10.28, 22.9, 4.2), (7.90, 29.8, 5.6), (13.51, 22.4, 3.8)),
    "vMF-VAE": ((1.74, 15.2, 2.0), (0.03, 22.4, 2.8), (2.06, 8.5, 1.1)),
    "Coupled-vMF-VAE": ((2.37, 16.1, 2.3), (2.60, 25.1, 4.0), (3.37, 10.3, 1.4)),
    "CNN-VAE": ((78.49, 32.0, 7.8), (17.26, 32.9, 7.1), (30.18, 24.9, 5.3)),
    "Coupled-CNN-VAE": ((80.54, 31.8, 7.7), (19.15, 33.4, 7.3), (37.62, 26.9, 5.9)),
    "WAE": ((15.09, 24.8, 5.1), (15.08, 30.7, 6.1), (24.73, 24.2, 4.5)),
    "Coupled-WAE": ((18.51, 24.7, 5.1), (18.56, 32.5, 6.6), (30.08, 27.7, 5.3)),
    "VAE-NF": ((5.63, 19.2, 3.3), (5.64, 25.6, 4.5), (8.02, 13.7, 2.1)),
    "Coupled-VAE-NF": ((5.86, 19.4, 3.3), (6.06, 26.3, 4.6), (9.14, 15.3, 2.5)),
    "WAE-NF": ((7.18, 19.7, 3.5), (7.95, 26.0, 4.6), (11.43, 13.8, 2.2)),
    "Coupled-WAE-NF": ((8.10, 20.7, 3.7), (8.53, 27.2, 5.0), (12.56, 14.9, 2.5)),
    "CycAnn-VAE": ((1.55, 16.3, 2.3), (1.18, 22.6, 3.2), (3.09, 8.3, 1.1)),
    "Coupled-CycAnn-VAE": ((2.27, 16.7, 2.6), (2.01, 23.1, 3.4), (3.89, 10.9, 1.5)),
    "PreFB-VAE": ((20.6, 25.5, 5.7), (20.3, 33.1, 6.8), (26.2, 27.2, 5.2)),
    "Coupled-PreFB-VAE": ((23.2, 25.8, 5.8), (21.0, 33.3, 6.8), (27.0, 27.2, 5.3)),
    "Lagging-VAE": ((2.90, None, None), (0.96, None, None), (3.04, None, None)),
    "Coupled-Lagging-VAE": ((3.29, None, None), (2.36, None, None), (3.06, None, None)),
}

# Table 3: hyperparameter analysis on PTB and Yelp.
# (block, distance, lambda_m, lambda_r) -> {dataset: (NLL, KL, PPL, MI, BLEU-1, BLEU-2)}
_TABLE3: list[tuple[str, str, float, float, tuple, tuple]] = [
    ("RQ, λ_r = 1.0", "rq", 0.1, 1.0, (103.1, 9.5, 110.5, 11.99, 23.4, 4.5), (191.2, 8.0, 51.6, 9.65, 30.4, 5.8)),
    ("RQ, λ_r = 1.0", "rq", 1.0, 1.0, (103.3, 10.7, 111.4, 14.32, 24.0, 4.8), (191.1, 8.1, 51.5, 9.92, 30.5, 5.8)),
    ("RQ, λ_r = 1.0", "rq", 5.0, 1.0, (103.7, 16.1, 113.2, 32.78, 26.5, 5.8), (191.5, 12.8, 51.9, 19.77, 32.8, 6.5)),
    ("RQ, λ_m = 0.1", "rq", 0.1, 0.0, (104.1, 7.3, 115.3, 8.60, 21.0, 3.7), (191.7, 5.8, 52.1, 6.40, 27.7, 5.0)),
    ("RQ, λ_m = 0.1", "rq", 0.1, 0.5, (103.4, 9.2, 111.8, 11.58, 23.1, 4.3), (191.3, 7.8, 51.7, 9.32, 29.8, 5.7)),
    ("RQ, λ_m = 0.1", "rq", 0.1, 1.0, (103.1, 9.5, 110.5, 11.99, 23.4, 4.5), (191.2, 8.0, 51.6, 9.65, 30.4, 5.8)),
    ("RQ, λ_m = 0.1", "rq", 0.1, 5.0, (103.1, 9.1, 110.6, 11.15, 22.9, 4.4), (192.9, 8.0, 53.4, 9.53, 30.0, 5.8)),
    ("Eucl, λ_r = 1.0", "eucl", 0.1, 1.0, (103.3, 10.1, 111.5, 13.25, 23.4, 4.7), (191.2, 9.2, 51.6, 11.69, 31.1, 6.0)),
    ("Eucl, λ_r = 1.0", "eucl", 1.0, 1.0, (103.9, 17.4, 114.5, 30.52, 27.7, 6.1), (192.1, 14.3, 52.5, 23.14, 33.8, 6.9)),
    ("Eucl, λ_r = 1.0", "eucl", 5.0, 1.0, (108.9, 33.3, 144.0, 98.02, 32.0, 8.5), (194.4, 25.0, 55.1, 61.62, 36.8, 8.2)),
]
_TABLE3_VAE = ((103.6, 8.6, 112.9, 10.48, 23.2, 4.4), (193.7, 7.2, 54.3, 8.28, 28.7, 5.3))

# Table 4: signal matching off (λ_m = 0). label -> (preset, λ_m or None for the Table 1 value, PTB, Yelp)
_TABLE4: list[tuple[str, str, float | None, tuple, tuple]] = [
    ("Coupled-VAE*", "coupled-vae", None, (103.1, 110.5), (191.2, 51.6)),
    ("Coupled-VAE (λ_m=0)", "coupled-vae", 0.0, (103.1, 110.3), (190.7, 51.1)),
    ("Coupled-VAE-NF*", "coupled-vae-nf", None, (102.6, 108.1), (191.8, 52.2)),
    ("Coupled-VAE-NF (λ_m=0)", "coupled-vae-nf", 0.0, (102.8, 109.1), (192.7, 53.2)),
    ("Coupled-vMF-VAE*", "coupled-vmf-vae", None, (103.0, 110.1), (191.2, 51.6)),
    ("Coupled-vMF-VAE (λ_m=0)", "coupled-vmf-vae", 0.0, (104.4, 117.1), (193.5, 54.1)),
]

# Table 8: dialogue generation on Switchboard. (label, preset, λ_m, NLL, KL, PPL, Dist-1, Dist-2)
# The transcribed copy does not show the Coupled-CVAE NLL (KL) cells legibly; the Dist columns of
# the λ_m = 1.0 / 2.0 rows are interleaved in it and were read as the monotone sequence.
_TABLE8: list[tuple[str, str, float | None, float | None, float | None, float, float, float]] = [
    ("GRU Encoder-Decoder", "seq2seq", None, 53.9, None, 41.6, 0.33, 0.80),
    ("CVAE", "cvae", None, 54.0, 3.8, 41.8, 0.61, 2.60),
    ("Coupled-CVAE (λ_m=0.1)", "coupled-cvae", 0.1, None, None, 42.2, 0.71, 3.18),
    ("Coupled-CVAE (λ_m=0.5)", "coupled-cvae", 0.5, None, None, 42.5, 0.78, 3.63),
    ("Coupled-CVAE (λ_m=1.0)", "coupled-cvae", 1.0, None, None, 42.7, 0.86, 4.10),
    ("Coupled-CVAE (λ_m=2.0)", "coupled-cvae", 2.0, None, None, 43.6, 0.99, 5.16),
]


def _family_block(label: str) -> str:
    return label[len("Coupled-"):] if label.startswith("Coupled-") else label


def _rows() -> list[PaperRow]:
    rows: list[PaperRow] = []
    for label, (preset, cells) in _TABLE1.items():
        for dataset, (nll, kl, ppl) in zip(_T1_DATASETS, cells):
            rows.append(PaperRow("1", label, dataset, preset, {"nll": nll, "kl": kl, "ppl": ppl},
                                 block=_family_block(label), note=_T1_NOTES.get(label, "")))
    for label, cells in _TABLE2.items():
        preset = _TABLE1[label][0]
        for dataset, (mi, b1, b2) in zip(_T1_DATASETS, cells):
            rows.append(PaperRow("2", label, dataset, preset, {"mi_loo": mi, "bleu1": b1, "bleu2": b2},
                                 block=_family_block(label), note=_T1_NOTES.get(label, "")))
    keys = ("nll", "kl", "ppl", "mi_loo", "bleu1", "bleu2")
    for block, distance, lm, lr, ptb, yelp in _TABLE3:
        star = "*" if (distance, lm, lr) == ("rq", 0.1, 1.0) else ""
        label = f"{'RQ' if distance == 'rq' else 'Eucl'} λ_m={lm:.1f} λ_r={lr:.1f}{star}"
        for dataset, cells in (("ptb", ptb), ("yelp13", yelp)):
            rows.append(PaperRow("3", label, dataset, "coupled-vae", dict(zip(keys, cells)),
                                 coupling={"distance": distance, "lambda_m": lm, "lambda_r": lr}, block=block,
                                 note="also Table 1/2" if star else ""))
    for dataset, cells in (("ptb", _TABLE3_VAE[0]), ("yelp13", _TABLE3_VAE[1])):
        rows.append(PaperRow("3", "VAE", dataset, "vae", dict(zip(keys, cells)), block="VAE"))
    for label, preset, lm, ptb, yelp in _TABLE4:
        for dataset, (nll, ppl) in (("ptb", ptb), ("yelp13", yelp)):
            rows.append(PaperRow("4", label, dataset, preset, {"nll": nll, "ppl": ppl},
                                 coupling=None if lm is None else {"lambda_m": lm}, block=preset,
                                 note="λ_m of Table 1" if lm is None else ""))
    for label, preset, lm, nll, kl, ppl, d1, d2 in _TABLE8:
        rows.append(PaperRow("8", label, "switchboard", preset,
                             {"nll": nll, "kl": kl, "ppl": ppl, "dist1": d1, "dist2": d2},
                             coupling=None if lm is None else {"lambda_m": lm}, block="Switchboard",
                             note="exact NLL" if preset == "seq2seq" else
                             ("NLL (KL) not legible in the reference copy" if nll is None else "")))
    return rows


PAPER_ROWS: tuple[PaperRow, ...] = tuple(_rows())


def paper_rows(table: str | None = None, dataset: str | None = None) -> list[PaperRow]:
    return [r for r in PAPER_ROWS if (table is None or r.table == table) and (dataset is None or r.dataset == dataset)]


def paper_frame():
    """All published values as a long pandas frame (table, label, dataset, preset, metric, value, ...)."""
    import pandas as pd

    records = []
    for r in PAPER_ROWS:
        for metric, value in r.values.items():
            records.append({"table": r.table, "label": r.label, "dataset": r.dataset, "preset": r.preset,
                            "block": r.block, "metric": metric, "value": value, "split": PAPER_SPLIT,
                            "distance": (r.coupling or {}).get("distance"),
                            "lambda_m": (r.coupling or {}).get("lambda_m"),
                            "lambda_r": (r.coupling or {}).get("lambda_r"), "note": r.note, "source": SOURCE})
    return pd.DataFrame(records)
