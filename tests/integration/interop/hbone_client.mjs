// An independent HBONE client: Node.js's built-in http2 (nghttp2), not Python's h2.
//
// Reads one JSON object on stdin:
//   {host, port, authority, cert, key, ca, payload, forwarded}
// opens mutual TLS (TLS 1.3, ALPN h2) to host:port, sends CONNECT authority,
// writes payload, half-closes, reads everything back, and prints one JSON line:
//   {status, received, alpn, error}
import http2 from "node:http2";

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const opts = JSON.parse(Buffer.concat(chunks).toString("utf8"));

function done(result) {
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0);
}

const timer = setTimeout(() => done({ error: "timeout" }), 10000);

const session = http2.connect(`https://${opts.host}:${opts.port}`, {
  cert: opts.cert,
  key: opts.key,
  ca: opts.ca,
  minVersion: "TLSv1.3",
  ALPNProtocols: ["h2"],
  // SPIFFE identities are URI SANs, not host names; the caller checks the identity
  checkServerIdentity: () => undefined,
});
session.on("error", (err) => done({ error: String(err) }));

const headers = { ":method": "CONNECT", ":authority": opts.authority };
if (opts.forwarded) headers["forwarded"] = opts.forwarded;
const stream = session.request(headers, { endStream: false });
let status = 0;
const received = [];
stream.on("response", (h) => {
  status = h[":status"];
  if (status !== 200) {
    clearTimeout(timer);
    session.destroy();
    done({ status, received: "", alpn: "h2", peer_san: "" });
    return;
  }
  stream.write(Buffer.from(opts.payload, "utf8"));
  stream.end(); // END_STREAM: our half-close
});
stream.on("data", (d) => received.push(d));
stream.on("error", (err) => done({ status, error: String(err) }));
stream.on("close", () => {
  clearTimeout(timer);
  const alpn = session.alpnProtocol;
  const peer = session.socket ? session.socket.getPeerCertificate() : {};
  session.close();
  done({
    status,
    received: Buffer.concat(received).toString("utf8"),
    alpn,
    peer_san: peer && peer.subjectaltname ? peer.subjectaltname : "",
  });
});
