"""The route stage's decisions as pure functions of the policy and the message: the
question's complexity score (``imbot.routing.complexity``) and the choice of models.
Imports nothing of ours but core, so it is tested (and benchmarked) without a broker."""
