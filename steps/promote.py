"""promote: move `champion` to a registered version when its test accuracy is at least the champion's."""

import contextlib

import mlflow

from cifar10_cnn import constants as C
from cifar10_cnn import entry_points, params, promotion, registry, tracking
from cifar10_cnn.errors import UserError
from cifar10_cnn.progress import say


def run(version: str, model_name: str, force: str) -> None:
    ref = params.version_ref(version)
    name = params.model_name(model_name)
    forced = params.BOOLEAN("force", force)
    names = registry.Names(name)
    client = mlflow.MlflowClient()
    # Read-compare-move must not interleave with another promotion or a registration, or the flavors
    # could end up with champions from different runs; one interrupted before is repaired first.
    # Without a lock (a tracking server), a marker on the registered model keeps promotions one at a time.
    with tracking.store_lock(registry.LOCK) as locked, contextlib.ExitStack() as marked:
        if not locked:
            marked.enter_context(promotion.one_at_a_time(client, names, mlflow.active_run().info.run_id))
        for change in registry.repair(client, names, locked):
            say("promote", f"repaired an interrupted registration: {change}")
        decision, chosen, replaced = promotion.promote(client, names, ref, forced)
    mlflow.set_tags({C.TAG_PROMOTION: "promoted" if decision.promote else "refused",
                     C.TAG_PROMOTION_REASON: decision.reason, C.TAG_CANDIDATE_VERSION: chosen})
    if not decision.promote:
        if decision.noop:
            say("promote", f"{name} v{chosen} is already the champion; nothing changed")
            return
        raise UserError(f"not promoting {name} v{chosen}: {decision.reason}; aliases unchanged "
                        "(use -P force=true to override)")
    say("promote", f"{name} v{chosen} and its ONNX twins are now @{registry.CHAMPION} ({decision.reason})")
    if replaced:
        say("promote", f"v{replaced} is now @{registry.PREVIOUS}; roll back with "
                       f"`mlflow run . -e promote -P version={registry.PREVIOUS} -P force=true`")


def main(argv=None):
    args = entry_points.parser("promote", __doc__).parse_args(argv)
    tracking.run_step("promote", run, **vars(args))


if __name__ == "__main__":
    main()
