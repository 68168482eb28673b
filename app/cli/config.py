"""Where the server is and which key to use, from options or the environment, and the two clients."""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx

from app.cli.output import CLIError

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@dataclass
class Config:
    base_url: str
    api_key: str | None
    admin_key: str | None
    timeout: float = 600.0

    @classmethod
    def from_env(cls, base_url: str | None = None, api_key: str | None = None) -> Config:
        url = base_url or _env("PREFIXD_BASE_URL", "OPENAI_BASE_URL") or DEFAULT_BASE_URL
        key = api_key or _env("PREFIXD_API_KEY", "OPENAI_API_KEY")
        # the admin key is a separate key (tenant routes refuse it), so it has its own variable;
        # PREFIXD_API_KEY may hold it too when one shell only administers
        admin = api_key or _env("PREFIXD_ADMIN_KEY", "PREFIXD_API_KEY", "OPENAI_API_KEY")
        return cls(base_url=url.rstrip("/"), api_key=key, admin_key=admin)

    def _key(self, admin: bool) -> str:
        key = self.admin_key if admin else self.api_key
        if not key:
            names = "PREFIXD_ADMIN_KEY (or PREFIXD_API_KEY)" if admin else "PREFIXD_API_KEY (or OPENAI_API_KEY)"
            raise CLIError(f"no API key: set {names} or pass --api-key")
        return key

    def openai(self, max_retries: int = 2):
        """The official client, for OpenAI's routes."""
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self._key(False), max_retries=max_retries,
                      timeout=self.timeout)

    def http(self, admin: bool = False) -> httpx.Client:
        """A plain client for our extension routes; paths are relative to the base URL (which ends
        in /v1)."""
        return httpx.Client(base_url=self.base_url + "/", headers={"Authorization": f"Bearer {self._key(admin)}"},
                            timeout=self.timeout)
