"""The terminal chat: a Textual app (and a plain one-shot mode) that talks to the bus directly.

It owns the screens, keys and `!!` commands of `chatbus chat`, and conversations saved as files; it reaches
models only through `bus.BusClient`, never through the gateway or a model runtime.
"""
