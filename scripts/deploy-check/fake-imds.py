"""A fake EC2 instance metadata service (IMDSv2) on 127.0.0.1 for scripts/deploy-check.sh.

Prints the port it listens on, then serves until killed. Answers a token PUT and the
metadata paths the user-data's instance-env.sh reads, and refuses a GET without the token.
"""

import http.server
import sys

TOKEN = "deploy-check-token"
META = {
    "instance-id": "i-0123456789abcdef0",
    "placement/availability-zone": "eu-west-1b",
    "local-ipv4": "10.0.102.17",
    "public-ipv4": "203.0.113.7",
    "public-hostname": "ec2-203-0-113-7.eu-west-1.compute.amazonaws.com",
}


class Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self, code, body):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._answer(200, TOKEN)
        else:
            self._answer(400, "bad token request")

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            self._answer(401, "IMDSv2 token required")
            return
        key = self.path.removeprefix("/latest/meta-data/")
        if key in META:
            self._answer(200, META[key])
        else:
            self._answer(404, "not found")

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
sys.stdout.close()
server.serve_forever()
