"""What one client may ask of the server: every limit in one frozen config, each a ``jaxformer serve`` flag.

A request beyond a limit gets a 4xx in OpenAI's error body naming the limit (and its flag); the
defaults are safe for a server on a network, and each flag raises its limit.
"""

import dataclasses

from jaxformer.config import Config, param


@dataclasses.dataclass(frozen=True)
class Limits(Config):
    """The server's limits per request, per key and per connection."""

    max_body_bytes: int = param(1 << 20, "largest request body in bytes (413 beyond, before it is read whole)", ge=1)
    body_seconds: float = param(30.0, "seconds a client has to send a request's body (408 after)", gt=0)
    head_seconds: float = param(10.0, "seconds a client has to send a request's line and headers (then the "
                                      "connection is closed)", gt=0)
    keep_alive_seconds: float = param(5.0, "seconds an idle keep-alive connection stays open", gt=0)
    max_header_bytes: int = param(16 << 10, "largest request line and headers in bytes (h11's limit)", ge=1024)
    max_connections: int = param(512, "open connections beyond which a new one gets 503", ge=1)
    max_stops: int = param(4, "stop strings per completion request", ge=0)
    max_stop_chars: int = param(256, "characters per stop string", ge=1)
    max_streams_per_key: int = param(64, "streamed completions open at once per API key (429 beyond; without "
                                         "keys, for all clients together)", ge=1)
    max_translation_inputs: int = param(64, "sentences per translation request", ge=1)
    max_translation_chars: int = param(2000, "characters per sentence to translate (then the model's max_len in "
                                             "tokens applies)", ge=1)
