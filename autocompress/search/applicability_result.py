"""What an applicability check found (:mod:`.applicability`): one :class:`PairCheck` per (technique,
layer, setting), the :class:`Applicability` result stored in the run folder, and its log lines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PairCheck:
    """The verdict on one (technique, layer) pair.

    Attributes:
        layer: the layer's name. technique: e.g. ``low rank (ratio)``, ``structured pruning``, ``int4``.
        setting: the harshest value tried, e.g. ``rank_ratio 0.1``.
        status: ``ok``, ``fails`` or ``no effect``.
        stage: where it failed (``apply``, ``forward``, ``lowering``), empty when ``ok``.
        reason: the error or the pipeline's note.
        removed: what left the domain, e.g. ``rank.fc -> fixed 1.0`` (empty when ``ok``).
        checked_on: the layer of the same structural role whose verdict this is (empty when the layer
            was checked itself, or is ``ok``).
    """

    layer: str
    technique: str
    setting: str
    status: str
    stage: str = ""
    reason: str = ""
    removed: str = ""
    checked_on: str = ""


@dataclass
class Applicability:
    """All verdicts, the narrowed domains they imply (Optuna name -> Param dict) and the cost."""

    checks: list[PairCheck] = field(default_factory=list)
    domains: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    lowerings: int = 0
    interactions: list[str] = field(default_factory=list)  # techniques that fail only on layers together
    applies: int = 0  # compress + forward runs (each checks one set of layers)
    roles: int = 0  # distinct structural roles among the layers (.roles): what the checks scale with

    @property
    def excluded(self) -> list[PairCheck]:
        return [c for c in self.checks if c.status != "ok"]

    def to_dict(self) -> dict:
        return {
            "checks": [asdict(c) for c in self.checks],
            "domains": self.domains,
            "seconds": self.seconds,
            "lowerings": self.lowerings,
            "interactions": self.interactions,
            "applies": self.applies,
            "roles": self.roles,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Applicability:
        return cls(
            [PairCheck(**c) for c in d.get("checks", [])],
            dict(d.get("domains", {})),
            float(d.get("seconds", 0.0)),
            int(d.get("lowerings", 0)),
            list(d.get("interactions", [])),
            int(d.get("applies", 0)),
            int(d.get("roles", 0)),
        )


def summary_lines(result: Applicability) -> list[str]:
    """The log lines of a check: the count and cost, then one line per excluded pair; the layers that
    took their verdict from a layer of the same structure are named on that layer's line."""
    lines = [
        f"applicability: {len(result.checks)} (technique, layer) pairs checked on the model in "
        f"{result.seconds:.1f} s ({result.lowerings} lowerings, {result.applies} compress + forward runs"
        + (f", layers in {result.roles} structural roles" if result.roles else "")
        + f"); {len(result.excluded)} excluded"
        + (":" if result.excluded else "")
    ]
    lines += [f"  warning: {w}" for w in result.interactions]
    groups: dict[tuple[str, str, str], list[PairCheck]] = {}  # (checked layer, technique, setting)
    for c in result.excluded:
        groups.setdefault((c.checked_on or c.layer, c.technique, c.setting), []).append(c)
    for (checked, _, _), members in groups.items():
        c = next((m for m in members if m.layer == checked), members[0])
        others = [m.layer for m in members if m is not c]
        lines.append(
            f"  {c.layer}: {c.technique} at {c.setting} {c.status}"
            + (f" ({c.stage})" if c.status == "fails" else "")
            + f": {c.reason}"
            + (f" [{c.removed}]" if c.removed else "")
            + (f"; the same for {len(others)} more of its structure ({_names(others)})" if others else "")
        )
    return lines


def _names(layers: list[str], shown: int = 2) -> str:
    """``a, b and 9 more`` (all of them when there are few)."""
    if len(layers) <= shown + 1:
        return ", ".join(layers)
    return f"{', '.join(layers[:shown])} and {len(layers) - shown} more"
