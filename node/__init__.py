"""A node: loads a model and serves it on the bus.

`node.loader` loads a model (devices, dtype, 8/4-bit, LoRA, the GGUF of the default model converted once);
an engine (`node.hf.HFEngine`, behind the `node.engine.Engine` protocol) runs it on its own worker thread
with continuous batching; `node.service.NodeService` is the bus adapter that accepts requests, heartbeats
and publishes token streams. The engine knows torch and not NATS; the service knows NATS and not torch.
Nothing here knows the gateway or the UIs.
"""
