"""`prefixd`: the command line client of a prefixd server.

It talks HTTP only (nothing here imports the server's modules): the official `openai` client for
OpenAI's routes, httpx for our extensions (admin, export/import, bases). Configuration comes from
PREFIXD_BASE_URL / PREFIXD_API_KEY (PREFIXD_ADMIN_KEY for admin commands), else OPENAI_BASE_URL /
OPENAI_API_KEY. See docs/CLI.md.
"""
