"""The operator console (``imbot console``, docs/console.md): the pipeline now, a
conversation and a message's way through the stages, the dead-letter queue, money and
quality, in a browser. Server-rendered pages (Jinja2) over the storage room's
repositories and the streams room's operator tools; nothing of the service imports it."""
