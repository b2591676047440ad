"""Submits a compiled pipeline to Kubeflow Pipelines with the kfp 2.5 client.

KubeflowV2DagRunner writes a ``PipelineJob`` JSON; the kfp 2.x client
uploads packages (``.yaml``/``.yml``, or a ``.zip``/``.tar.gz`` holding one)
whose first YAML document is a bare ``PipelineSpec``. `to_kfp_package` writes
that rendition of the same spec (``pipelineSpec``, with
``defaultPipelineRoot`` set to the compiled pipeline root), and `submit`
creates the run with ``Client.create_run_from_pipeline_package`` (which
gets or creates the experiment).

Failures come back as `DeployError` with a one-line message: an unreachable
host (checked first, with a short timeout, before anything is compiled), an
authentication failure (HTTP 401/403, or a redirect to a login page, as
Kubeflow's Dex/oauth2-proxy answers unauthenticated API calls), a pipeline
parameter the spec does not declare, or an API error.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Optional, Sequence

HEALTHZ_PATH = "/apis/v2beta1/healthz"
DEFAULT_TIMEOUT_S = 10.0


class DeployError(RuntimeError):
    """A deployment failure; str() is one line."""


# --------------------------------------------------------------------------- params
def parse_params(items: Sequence[str]) -> Dict[str, Any]:
    """["k=v", ...] -> {k: v}; v is parsed as JSON when it is JSON (numbers,
    booleans, objects), else kept as a string."""
    params: Dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DeployError(f"--param {item!r}: expected NAME=VALUE")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def check_params(pipeline_spec: Dict[str, Any], params: Dict[str, Any]) -> None:
    declared = pipeline_spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise DeployError(f"--param {', '.join(unknown)}: not a parameter of the pipeline "
                          f"(it declares {sorted(declared) or 'none'})")


# --------------------------------------------------------------------------- package
def to_kfp_package(compiled_path: str, package_path: str) -> str:
    """Writes the YAML package the kfp client uploads (the PipelineSpec of the
    compiled PipelineJob, pipeline root included) and returns its path."""
    import yaml

    from kubeflow.compile import load_pipeline_job, pipeline_spec_proto

    job = load_pipeline_job(compiled_path)
    pipeline_spec_proto(job)  # the upload must parse as KFP's PipelineSpec
    spec = dict(job["pipelineSpec"])
    root = spec.get("defaultPipelineRoot") or job.get("runtimeConfig", {}).get("gcsOutputDirectory")
    if root:
        spec["defaultPipelineRoot"] = root
    if not package_path.endswith((".yaml", ".yml")):
        raise DeployError(f"{package_path}: the kfp client uploads .yaml packages")
    with open(package_path, "w") as f:
        f.write(f"# PIPELINE DEFINITION\n# Name: {spec['pipelineInfo']['name']}\n"
                "# Compiled by deepseek-tfx with TFX's KubeflowV2DagRunner.\n")
        yaml.safe_dump(spec, f, sort_keys=True)
    return package_path


# --------------------------------------------------------------------------- errors
def _auth_headers(token: Optional[str], cookie: Optional[str]) -> Dict[str, str]:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cookie:
        headers["Cookie"] = cookie
    return headers


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: D401 - urllib API
        return None


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return text[:200]


def check_reachable(host: str, token: Optional[str] = None, cookie: Optional[str] = None,
                    timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """One GET of the API's healthz endpoint, redirects not followed; raises
    `DeployError` for a refused/unresolvable/silent host or an auth wall."""
    parsed = urllib.parse.urlparse(host)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise DeployError(f"--host {host!r}: expected an http(s):// URL of the Kubeflow Pipelines API/UI")
    url = host.rstrip("/") + HEALTHZ_PATH
    request = urllib.request.Request(url, headers=_auth_headers(token, cookie))
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(65536)
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise DeployError(f"authentication failed at {host} (HTTP {e.code}): pass --token or "
                              "--cookie with valid credentials") from None
        if e.code in (301, 302, 303, 307, 308):
            where = e.headers.get("Location", "")
            raise DeployError(f"authentication required at {host}: the API redirects to {where or 'a login page'}; "
                              "pass --token or --cookie (e.g. authservice_session=...)") from None
        if e.code == 404:
            raise DeployError(f"{host} is not a Kubeflow Pipelines v2 API ({url} answered 404)") from None
        raise DeployError(f"{host}: healthz answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DeployError(f"cannot reach Kubeflow Pipelines at {host}: {_reason(e)}") from None
    if "html" in kind.lower() or body.lstrip()[:1] == b"<":
        raise DeployError(f"authentication required at {host}: the API answered with an HTML page "
                          "(a login page?); pass --token or --cookie")


def _api_error(host: str, error: BaseException) -> DeployError:
    status = getattr(error, "status", None)
    if status in (401, 403):
        return DeployError(f"authentication failed at {host} (HTTP {status}): pass --token or --cookie "
                           "with valid credentials")
    if status:
        body = getattr(error, "body", "") or ""
        try:
            message = json.loads(body).get("message") or json.loads(body).get("error") or body
        except (ValueError, AttributeError):
            message = body or getattr(error, "reason", "")
        message = " ".join(str(message).split())[:300]
        return DeployError(f"Kubeflow Pipelines at {host} rejected the run (HTTP {status}): {message}")
    return DeployError(f"cannot reach Kubeflow Pipelines at {host}: {_reason(error)}")


# --------------------------------------------------------------------------- submit
def submit(package_path: str, host: str, experiment: Optional[str] = None, run_name: Optional[str] = None,
           params: Optional[Dict[str, Any]] = None, namespace: Optional[str] = None,
           pipeline_root: Optional[str] = None, token: Optional[str] = None, cookie: Optional[str] = None,
           timeout: float = DEFAULT_TIMEOUT_S, preflight: bool = True) -> Dict[str, str]:
    """Creates a run of the YAML package; returns {"run_id", "experiment", "url"}."""
    import kfp
    import kfp_server_api
    import urllib3

    if preflight:
        check_reachable(host, token, cookie, timeout)
    try:
        kwargs: Dict[str, Any] = {"host": host, "existing_token": token, "cookies": cookie}
        if namespace:
            kwargs["namespace"] = namespace
        client = kfp.Client(**kwargs)
        result = client.create_run_from_pipeline_package(
            package_path, arguments=params or {}, run_name=run_name, experiment_name=experiment,
            namespace=namespace, pipeline_root=pipeline_root)
    except kfp_server_api.ApiException as e:
        raise _api_error(host, e) from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as e:
        raise _api_error(host, e) from None
    run_id = result.run_id
    return {"run_id": run_id, "experiment": experiment or "Default",
            "url": f"{host.rstrip('/')}/#/runs/details/{run_id}"}


def deploy_compiled(compiled_path: str, host: str, workdir: str, **kwargs) -> Dict[str, str]:
    """Converts the compiled PipelineJob to the YAML package in `workdir`
    and submits it (see `submit`); checks parameters against the spec."""
    from kubeflow.compile import load_pipeline_job

    job = load_pipeline_job(compiled_path)
    check_params(job["pipelineSpec"], kwargs.get("params") or {})
    name = os.path.splitext(os.path.basename(compiled_path))[0] or "pipeline"
    package = to_kfp_package(compiled_path, os.path.join(workdir, f"{name}.yaml"))
    root = job["pipelineSpec"].get("defaultPipelineRoot") or job.get("runtimeConfig", {}).get("gcsOutputDirectory")
    kwargs.setdefault("pipeline_root", root)
    return submit(package, host, **kwargs)
