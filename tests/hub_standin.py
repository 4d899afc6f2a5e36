"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, with only the endpoints that
``HfApi.create_repo`` and ``HfApi.upload_folder`` call: create a repo, validate a README's YAML
front matter, preupload (every file is answered "regular", so it travels base64-encoded in the
commit itself) and the NDJSON commit. It keeps the files each repo received."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class StandInHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(f"POST {self.path}")
                status, reply = hub.handle(self.path.split("?")[0], body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}"
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.repos[repo] = {}
            return 200, {"url": f"{self.url}/{repo}", "name": repo, "id": repo}
        if path == "/api/validate-yaml":  # the Hub rejects a README whose metadata is not a mapping
            content = json.loads(body)["content"]
            head = content.split("\n---\n", 1)[0][4:] if content.startswith("---\n") else ""
            if not isinstance(yaml.safe_load(head) or {}, dict):
                return 400, {"errors": [{"message": "metadata is not a YAML mapping"}], "warnings": []}
            return 200, {"errors": [], "warnings": []}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/[^/]+", path):
            if m.group(1) not in self.repos:
                return 404, {"error": "Repository not found"}
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": None} for f in files]}
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/[^/]+", path):
            repo = m.group(1)
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    assert value["encoding"] == "base64", value
                    self.repos[repo][value["path"]] = base64.b64decode(value["content"])
                elif item["key"] != "header":
                    return 400, {"error": f"the stand-in takes regular files only, not {item['key']}"}
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40,
                         "success": True}
        return 404, {"error": f"the stand-in has no {path}"}

    def __enter__(self) -> "StandInHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def folder_files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path -> bytes), as the Hub should hold them."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}
