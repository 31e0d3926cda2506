"""The fleet's rollout router: one OpenAI-compatible base URL in front of every engine's own
vLLM OpenAI app (``weightsync.engine.openai_server``).

``choice`` decides where a request may go (pure: statuses in, a decision out); ``proxy``
forwards it over HTTP and streams the answer back; ``router`` owns the engines' tokens, the
requests in flight and the waiting. The control plane serves it as a route family
(``weightsync.api.routes.openai``).
"""
