"""The web app: NiceGUI pages for chat, side-by-side, arena battles, the leaderboard and the node list.

Each browser tab talks to the bus through one shared `bus.BusClient`; chats and votes are written to the
CB_LOGS stream, from which the leaderboard is computed. It never imports the node or the gateway.
"""
