"""``Sven.last_step``: what one step did, with the spectrum's values computed only when read."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from sven.opt.spectrum import Spectrum

SPECTRUM_KEYS = ("kept_singular_values", "sigma_max", "rtol_cut")


def spectrum_entries(spectrum: Spectrum) -> dict[str, Any]:
    """Singular values kept (r,) on the CPU, σ_max and the absolute cut rtol·σ_max of a spectrum."""
    return {
        "kept_singular_values": spectrum.sigma.cpu(),
        "sigma_max": spectrum.sigma_max,
        "rtol_cut": spectrum.rtol_used * spectrum.sigma_max,
    }


def history_entry(step: int, spectrum: Spectrum) -> dict[str, Any]:
    """One ``Sven.svd_history`` entry: the kept and all computed singular values of a step's spectrum."""
    return {"step": step, "rank_kept": spectrum.rank_kept, **spectrum_entries(spectrum),
            "all_singular_values": spectrum.sigma_all.cpu()}


class StepReport(Mapping[str, Any]):
    """A read-only dict of a step's diagnostics.

    The entries in ``SPECTRUM_KEYS`` come from the step's spectrum the first time one of
    them is read: a Gram solve that needed no eigendecomposition (see
    ``sven.opt.spectrum.CertifiedGramSpectrum``) then pays for one only when asked.
    """

    def __init__(self, entries: dict[str, Any], spectrum: Spectrum | None = None) -> None:
        self._entries = dict(entries)
        self._spectrum = spectrum

    def _load_spectrum(self) -> None:
        if self._spectrum is not None:
            self._entries.update(spectrum_entries(self._spectrum))
            self._spectrum = None

    def __getitem__(self, key: str) -> Any:
        if key in SPECTRUM_KEYS:
            self._load_spectrum()
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        pending = SPECTRUM_KEYS if self._spectrum is not None else ()
        return iter([*self._entries, *pending])

    def __len__(self) -> int:
        return len(self._entries) + (len(SPECTRUM_KEYS) if self._spectrum is not None else 0)

    def __repr__(self) -> str:
        return f"StepReport({dict(self)!r})"
