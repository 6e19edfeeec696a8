"""The umbrella command: `chatbus up` starts a whole system on one machine, and every other package adds
its commands (`models`, `chat`, `node`, `gateway`, `train`, `eval`, ...) through its `commands.py`.
"""
