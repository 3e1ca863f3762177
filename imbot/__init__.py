"""imbot: large language models behind an Easemob (环信) IM app.

The rooms live under this one namespace (see ARCHITECTURE.md): ``imbot.core`` is the shared
kernel, ``imbot.gateway``, ``imbot.streams``, ``imbot.sender``, ``imbot.adapters``,
``imbot.moderation`` and ``imbot.storage`` are the services' rooms, and ``imbot.cli`` is the
composition root that wires them together.
"""
