"""`mlflow ui --app-name cifar10-cnn`: MLflow's own server and UI, where an experiment opens on its runs table.

MLflow 3.17's UI decides what `#/experiments/<id>` shows from the browser's localStorage key
`mlflow.workflowType_v1`, not from the experiment's `mlflow.experimentKind` tag (the code that would read
the tag is switched off in that release). The key is "genai" until the user flips the sidebar's
GenAI / Machine learning switch, and only a link with `?workflowType=machine_learning` overrides it, so a
newcomer who clicks an experiment's name on the home page lands on an empty GenAI overview. This app is
MLflow's FastAPI app with one script added to the page it serves: a browser that has not chosen yet starts
on "machine_learning". A choice made with the switch is kept.
"""

from __future__ import annotations

WORKFLOW_KEY = "mlflow.workflowType_v1"  # JSON in localStorage: "genai" or "machine_learning"
SEED = (b'<script>try{if(localStorage.getItem("' + WORKFLOW_KEY.encode() + b'")===null){localStorage.setItem("'
        + WORKFLOW_KEY.encode() + b'",JSON.stringify("machine_learning"))}}catch(e){}</script>')


class MachineLearningFirst:
    """ASGI middleware: HTML pages get SEED right after `<head>`; everything else passes untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        start: dict = {}
        body: list[bytes] = []

        async def capture(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if not headers.get(b"content-type", b"").startswith(b"text/html"):
                    start["passthrough"] = True
                    return await send(message)
                start.update(message)
                return None
            if start.get("passthrough"):
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return None
            page = b"".join(body).replace(b"<head>", b"<head>" + SEED, 1)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
            return await send({"type": "http.response.body", "body": page})

        return await self.app(scope, receive, capture)


def _app():
    from mlflow.server.fastapi_app import app as mlflow_app

    return MachineLearningFirst(mlflow_app)


app = _app()
