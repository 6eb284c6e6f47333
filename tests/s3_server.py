"""A real S3 API server on loopback for tests: moto's server app under werkzeug, in a thread.

`S3Server.hook`, when set, sees every request before moto does and may refuse it: True answers a bare 503
(no S3 error body), a tuple (status line, S3 error code) answers that, e.g. ("403 Forbidden", "AccessDenied"). The
tests use it to kill a client process at an exact point of its commit and to inject write failures.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Callable
from urllib.parse import parse_qs

from werkzeug.serving import WSGIRequestHandler, make_server


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


def is_object_write(environ: dict[str, Any]) -> bool:
    """A request that makes an object appear: PutObject, or CompleteMultipartUpload."""
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    if environ["REQUEST_METHOD"] == "PUT":
        return "partNumber" not in query and "HTTP_X_AMZ_COPY_SOURCE" not in environ and environ["PATH_INFO"].count("/") >= 2
    return environ["REQUEST_METHOD"] == "POST" and "uploadId" in query


class S3Server:
    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app

        self.hook: Callable[[dict[str, Any]], bool] | None = None
        self.requests: list[tuple[str, str, str]] = []
        """(method, path, query) of every request, in order."""
        self.sent_bytes: list[tuple[str, str, int]] = []
        """(method, path, body bytes sent) of every answered request."""
        app = DomainDispatcherApplication(create_backend_app)

        def wsgi(environ: dict[str, Any], start_response: Callable) -> Any:
            method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
            self.requests.append((method, path, environ.get("QUERY_STRING", "")))
            refusal = self.hook(environ) if self.hook is not None else None
            if isinstance(refusal, tuple):  # an S3 error the client parses
                start_response(refusal[0], [("Content-Type", "application/xml")])
                return [f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{refusal[1]}</Code>'
                        f'<Message>refused by the test</Message></Error>'.encode()]
            if refusal:
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"refused by the test"]
            body = b"".join(app(environ, start_response))
            self.sent_bytes.append((method, path, len(body)))
            return [body]

        self._server = make_server("127.0.0.1", 0, wsgi, threaded=True, request_handler=_QuietHandler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def sent(self, prefix: str) -> int:
        """Body bytes the server sent in answer to GETs of objects whose path starts with `prefix`."""
        return sum(n for m, p, n in list(self.sent_bytes) if m == "GET" and p.startswith(prefix))

    def env(self) -> dict[str, str]:
        """What pyarrow, Polars and boto3 need to use this server (dummy credentials)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_ALLOW_HTTP": "true"}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"saeray-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under `prefix`: key -> content."""
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = c.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
