"""The evaluation layer: measures how well a policy ranks and earns, offline and online.

Ranking metrics (:mod:`.metrics`), off-policy estimators (:mod:`.ope`), classical peers
(:mod:`.baselines`), online baseline policies (:mod:`.bandits`) and simulators (:mod:`.sim`).
"""
