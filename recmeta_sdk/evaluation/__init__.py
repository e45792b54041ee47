"""The evaluation layer: ranking metrics (:mod:`.metrics`), off-policy estimators (:mod:`.ope`),
classical peers (:mod:`.baselines`), online baseline policies (:mod:`.bandits`) and simulators
(:mod:`.sim`)."""
