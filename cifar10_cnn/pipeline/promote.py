"""promote: move `champion` to a registered version when its test accuracy is at least the champion's."""

from __future__ import annotations

import mlflow

from .. import constants as C
from .. import params, registry, tracking
from ..errors import UserError
from .common import say


def run(version: str, model_name: str, force: str) -> None:
    ref = params.version_ref(version)
    name = params.model_name(model_name)
    forced = params.boolean("force", force)
    onnx_name = name + C.ONNX_REGISTERED_SUFFIX
    # Read-compare-move must not interleave with another promotion, or the two flavors could end up
    # with champions from different runs.
    with tracking.store_lock("promote") as locked:
        if not locked:
            say("promote", "note: this tracking store offers no lock; run one promotion at a time")
        decision, chosen, replaced = registry.promote(mlflow.MlflowClient(), name, ref, onnx_name, forced)
    mlflow.set_tags({"cifar10.promotion": "promoted" if decision.promote else "refused",
                     "cifar10.promotion_reason": decision.reason, "cifar10.candidate_version": chosen})
    if not decision.promote:
        if decision.noop:
            say("promote", f"{name} v{chosen} is already the champion; nothing changed")
            return
        raise UserError(f"not promoting {name} v{chosen}: {decision.reason}; aliases unchanged "
                        "(use -P force=true to override)")
    say("promote", f"{name} v{chosen} and its ONNX twin are now @{registry.CHAMPION} ({decision.reason})")
    if replaced:
        say("promote", f"v{replaced} is now @{registry.PREVIOUS}; roll back with "
                       f"`mlflow run . -e promote -P version={registry.PREVIOUS} -P force=true`")
