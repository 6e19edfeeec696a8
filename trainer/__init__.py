"""Fine-tuning as bus jobs: SFT, LoRA and QLoRA on ShareGPT-style conversations.

A worker (`python -m trainer`) takes train jobs from the CB_JOBS work queue, trains with loss on the
assistant tokens only, checkpoints so a redelivered job resumes, and stores the adapter or model in the
artifact store, from which a node can serve it. It shares `node.loader` for loading models.
"""
