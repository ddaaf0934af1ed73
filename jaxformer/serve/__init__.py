"""The HTTP server (``jaxformer serve``): ``app`` (routes), ``protocol`` (requests, errors and
response objects), ``completions`` (a completions request in flight), ``text`` (a choice's text),
``engine`` (continuous-batching GPT-2), ``translations`` (the translation worker), ``compilations``
(the XLA compilation counter)."""
