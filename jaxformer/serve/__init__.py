"""The HTTP server (``jaxformer serve``): ``app`` (routes), ``gate`` (ids, keys, body limits, drain,
access log), ``limits`` (what a client may ask), ``metrics`` (Prometheus, access log), ``lifecycle``
(uvicorn: connection deadlines, graceful stop), ``protocol`` (requests, errors and response
objects), ``completions`` (a completions request in flight), ``text`` (a choice's text), ``engine``
(continuous-batching GPT-2), ``warmup`` (its start-up compilations), ``sequence`` (what the engine
decodes), ``translations`` (the translation worker), ``compilations`` (the XLA compilation counter)."""
