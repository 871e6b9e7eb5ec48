"""The search space: the searched fields of the run configuration (a YAML file) and a trial's configuration."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from colintern.training.arguments import RunConfig, apply_overrides, canonical_path
from colintern.utils import ColinternError

PARAMETER_TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class ParameterSpec:
    """One searched field (`section.field` of the run configuration) and its distribution."""

    path: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    @classmethod
    def from_dict(cls, path: str, data: dict, source: str = "search space") -> ParameterSpec:
        where = f"{source}: {path}"
        if not isinstance(data, dict):
            raise ColinternError(f"{where} must be a mapping like {{type: float, low: 1e-5, high: 1e-3, log: true}}")
        unknown = set(data) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise ColinternError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        kind = data.get("type") or ("categorical" if "choices" in data else None)
        if kind not in PARAMETER_TYPES:
            raise ColinternError(f"{where}: type must be one of {', '.join(PARAMETER_TYPES)} (got {kind!r})")
        if kind == "categorical":
            choices = data.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ColinternError(f"{where}: a categorical parameter needs a non-empty list of choices")
            return cls(path, kind, choices=tuple(choices))
        if "low" not in data or "high" not in data:
            raise ColinternError(f"{where}: a {kind} parameter needs low and high")
        cast = float if kind == "float" else int
        try:
            low, high = cast(float(data["low"])), cast(float(data["high"]))
            step = None if data.get("step") is None else cast(float(data["step"]))
        except (TypeError, ValueError) as error:
            raise ColinternError(f"{where}: low/high/step must be numbers ({error})") from error
        if low > high:
            raise ColinternError(f"{where}: low {low} is above high {high}")
        log = bool(data.get("log", False))
        if log and (low <= 0 or step is not None):
            raise ColinternError(f"{where}: a log-scaled range needs low > 0 and no step")
        return cls(path, kind, low=low, high=high, log=log, step=step)

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def field_name(self) -> str:
        return self.path.split(".", 1)[1]

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list:
        """The candidate values, for a categorical parameter or a stepped range (used for the memory corner)."""
        if self.type == "categorical":
            return list(self.choices)
        return [self.low, self.high]

    def to_dict(self) -> dict:
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        out: dict = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass
class SearchSpace:
    """The searched fields of the run configuration, in the order they are sampled."""

    parameters: list[ParameterSpec]
    source: str = "search space"

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise ColinternError(f"Search space not found: {path} (see experiments/configs/optuna_search_space.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ColinternError(f"{path} is not valid YAML: {error}") from error
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "search space") -> SearchSpace:
        if not isinstance(data, dict) or not isinstance(data.get("parameters"), dict) or not data["parameters"]:
            raise ColinternError(f"{source}: expected a mapping `parameters: {{section.field: {{type: ...}}}}`")
        unknown = set(data) - {"parameters"}
        if unknown:
            raise ColinternError(f"{source}: unknown top-level keys {', '.join(sorted(unknown))} (only `parameters`)")
        parameters = [ParameterSpec.from_dict(path, spec, source) for path, spec in data["parameters"].items()]
        space = cls(parameters, source)
        space.check_fields()
        return space

    def check_fields(self) -> None:
        """Every searched path must name a configuration field, and a value of the right type."""
        for spec in self.parameters:
            if "." not in spec.path:
                raise ColinternError(f"{self.source}: '{spec.path}' must be section.field (e.g. training.learning_rate)")
            for value in spec.values():
                apply_overrides(RunConfig(), {spec.section: {spec.field_name: value}}, self.source)

    def get(self, path: str) -> ParameterSpec | None:
        return next((p for p in self.parameters if canonical_path(p.path) == canonical_path(path)), None)

    def without(self, paths: set[str]) -> SearchSpace:
        return SearchSpace([p for p in self.parameters if p.path not in paths], self.source)

    def replace(self, spec: ParameterSpec) -> SearchSpace:
        return SearchSpace([spec if p.path == spec.path else p for p in self.parameters], self.source)

    def to_dict(self) -> dict:
        return {"parameters": {p.path: p.to_dict() for p in self.parameters}}

    def sample(self, trial) -> dict[str, Any]:
        return {spec.path: spec.suggest(trial) for spec in self.parameters}


def default_search_space_path(preset: str | None) -> Path:
    """experiments/configs/optuna_search_space_<preset>.yaml when it exists, else optuna_search_space.yaml."""
    from colintern.utils import PRESETS_DIR

    if preset:
        specific = PRESETS_DIR / f"optuna_search_space_{Path(preset).stem}.yaml"
        if specific.is_file():
            return specific
    return PRESETS_DIR / "optuna_search_space.yaml"


def nested(values: dict[str, Any]) -> dict[str, dict]:
    """{"training.learning_rate": 1e-3} -> {"training": {"learning_rate": 1e-3}}."""
    out: dict[str, dict] = {}
    for path, value in values.items():
        section, name = path.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """The base configuration with a trial's sampled values; alpha follows a searched rank when it is not searched."""
    config = copy.deepcopy(base)
    apply_overrides(config, nested(params), "trial parameters")
    if "lora.rank" in params and "lora.alpha" not in params:
        config.lora.alpha = config.lora.rank
    return config


def describe_params(params: dict) -> str:
    """{"training.learning_rate": 0.00123, "lora.rank": 8} -> "learning_rate=0.00123, rank=8" (for log lines)."""
    return ", ".join(f"{k.split('.', 1)[1]}={_short(v)}" for k, v in params.items())


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
