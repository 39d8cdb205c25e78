"""A small OpenAI-compatible `/v1/chat/completions` server for the endpoint-teacher tests.

It serves a saved tiny model (tests/_rra_tiny.py, greedy decoding) on 127.0.0.1, prints
`PORT <n>` once listening, and stops by itself after `--max-requests` answers or `--idle`
seconds without a request. `--fail-first N` answers the first N requests with HTTP 503 (to
exercise the client's retries).
"""

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


def load(folder: str):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model, tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-requests", type=int, default=200)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--model-dir", required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    model, tok = load(args.model_dir)
    state = {"served": 0, "seen": 0, "last": time.time()}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            with lock:
                state["last"] = time.time()
                state["seen"] += 1
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if state["seen"] <= args.fail_first:
                    return self._send(503, {"error": {"message": "warming up"}})
                ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
                x = torch.tensor([ids])
                with torch.no_grad():
                    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                         max_new_tokens=int(body.get("max_tokens", 64)),
                                         pad_token_id=tok.pad_token_id)
                text = tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
                state["served"] += 1
                self._send(200, {"id": f"tiny-{state['served']}", "object": "chat.completion",
                                 "model": body.get("model"),
                                 "auth": self.headers.get("Authorization"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant",
                                                          "content": text}}]})

    server = HTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 0.5
    print(f"PORT {server.server_address[1]}", flush=True)
    while state["served"] < args.max_requests and time.time() - state["last"] < args.idle:
        server.handle_request()
    server.server_close()
    print(f"SERVED {state['served']}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
