// A staff member's client with Element's own crypto (matrix-js-sdk + its Rust crypto, in
// Element's "only devices signed by their owner" mode), driven by the integration tests.
//
// Protocol: one JSON request per line on stdin ({"id", "cmd", ...args}); one JSON answer
// per line on stdout ({"id", "ok": true, ...} or {"id", "ok": false, "error"}). Everything
// the SDK logs goes to stderr, so stdout carries only answers.
//
// Every command may name the client it is for ("client": any string, default "default"),
// so one process can hold many signed-in devices (the fan-out benchmark).
//
// Commands:
//   login {base_url, user_id, password, device_name}  sign in, start the Rust crypto, set up
//        the user's own cross-signing (as Element does for a new account), start syncing;
//        invites are accepted as they come. Instead of a password: {device_id,
//        access_token} of a session made elsewhere (the first cross-signing upload needs no
//        interactive auth, MSC3967)
//   events {room_id?}         timeline events as the client sees them (cleartext type and
//        content once decrypted; decryption_failure: the SDK's reason code while it cannot)
//   rooms                     joined and invited room ids
//   create_room {invite, name?}      a private room, encrypted as Element makes them
//   members {room_id}         user id -> membership
//   send {room_id, body}      an m.text message (encrypted if the room is)
//   react {room_id, event_id, key}   an m.reaction annotation
//   trust {user_id, device_id?}      how this client sees that user's identity and device
//   stop
import "fake-indexeddb/auto";
import readline from "node:readline";

// matrix-js-sdk 43 asks for Node >= 22; on Node 20 only this is missing (used when sending)
if (!Promise.withResolvers) {
  Promise.withResolvers = function withResolvers() {
    let resolve, reject;
    const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
    return { promise, resolve, reject };
  };
}
for (const level of ["log", "info", "debug", "warn", "trace"]) {
  console[level] = (...args) => process.stderr.write(args.map(String).join(" ") + "\n");
}

const sdk = await import("matrix-js-sdk");
const { OnlySignedDevicesIsolationMode } = await import("matrix-js-sdk/lib/crypto-api/index.js");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
logger.setLevel?.(process.env.E2EE_CLIENT_LOG || "warn");

const clients = new Map();

function eventView(roomId, ev) {
  return {
    room_id: roomId,
    event_id: ev.getId(),
    sender: ev.getSender(),
    type: ev.getType(),
    content: ev.getContent(),
    encrypted: ev.isEncrypted(),
    decryption_failure: ev.isDecryptionFailure() ? String(ev.decryptionFailureReason) : null,
  };
}

async function waitPrepared(c) {
  if (c.getSyncState() === "PREPARED" || c.getSyncState() === "SYNCING") return;
  await new Promise((resolve, reject) => {
    const onSync = (state, _prev, data) => {
      if (state === "PREPARED" || state === "SYNCING") { c.off(sdk.ClientEvent.Sync, onSync); resolve(); }
      if (state === "ERROR") { c.off(sdk.ClientEvent.Sync, onSync); reject(new Error(String(data?.error))); }
    };
    c.on(sdk.ClientEvent.Sync, onSync);
  });
}

const handlers = {
  async login({ base_url, user_id, password, device_name, device_id, access_token }, name) {
    const resp = password === undefined || password === null
      ? { user_id, device_id, access_token }
      : await sdk.createClient({ baseUrl: base_url }).loginRequest({
        type: "m.login.password", identifier: { type: "m.id.user", user: user_id }, password,
        initial_device_display_name: device_name || "Element (test)",
      });
    const client = sdk.createClient({
      baseUrl: base_url, userId: resp.user_id, deviceId: resp.device_id, accessToken: resp.access_token,
    });
    await client.initRustCrypto({ useIndexedDB: false });
    const crypto = client.getCrypto();
    crypto.setDeviceIsolationMode(new OnlySignedDevicesIsolationMode());
    // Element sets up cross-signing for a new account at first sign-in
    await crypto.bootstrapCrossSigning({
      authUploadDeviceSigningKeys: async (makeRequest) => {
        await makeRequest(password ? { type: "m.login.password", identifier: { type: "m.id.user", user: user_id }, password } : null);
      },
    });
    client.on(sdk.RoomMemberEvent.Membership, (_ev, member) => {
      if (member.userId === client.getUserId() && member.membership === "invite") {
        client.joinRoom(member.roomId).catch((e) => console.warn("join failed", member.roomId, e));
      }
    });
    await client.startClient({ initialSyncLimit: 100 });
    await waitPrepared(client);
    clients.set(name, client);
    return { user_id: resp.user_id, device_id: resp.device_id };
  },

  async rooms(_req, _name, client) {
    const rooms = client.getRooms();
    return {
      joined: rooms.filter((r) => r.getMyMembership() === "join").map((r) => r.roomId),
      invited: rooms.filter((r) => r.getMyMembership() === "invite").map((r) => r.roomId),
    };
  },

  async events({ room_id }, _name, client) {
    const rooms = room_id ? [client.getRoom(room_id)].filter(Boolean) : client.getRooms();
    const out = [];
    for (const room of rooms) {
      for (const ev of room.getLiveTimeline().getEvents()) out.push(eventView(room.roomId, ev));
    }
    return { events: out };
  },

  async create_room({ invite, name }, _name, client) {
    const r = await client.createRoom({
      preset: "private_chat", name, invite: invite || [],
      initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
    });
    return { room_id: r.room_id };
  },

  async members({ room_id }, _name, client) {
    const room = client.getRoom(room_id);
    const out = {};
    for (const m of room ? room.getMembers() : []) out[m.userId] = m.membership;
    return { members: out };
  },

  async send({ room_id, body }, _name, client) {
    const r = await client.sendEvent(room_id, "m.room.message", { msgtype: "m.text", body });
    return { event_id: r.event_id };
  },

  async react({ room_id, event_id, key }, _name, client) {
    const r = await client.sendEvent(room_id, "m.reaction", {
      "m.relates_to": { rel_type: "m.annotation", event_id, key },
    });
    return { event_id: r.event_id };
  },

  async trust({ user_id, device_id }, _name, client) {
    const crypto = client.getCrypto();
    const devices = await crypto.getUserDeviceInfo([user_id], true);
    const user = await crypto.getUserVerificationStatus(user_id);
    const out = {
      known: user.known, needs_user_approval: user.needsUserApproval,
      cross_signing_verified: user.isCrossSigningVerified(),
      devices: [...(devices.get(user_id)?.keys() ?? [])],
    };
    if (device_id) {
      const d = await crypto.getDeviceVerificationStatus(user_id, device_id);
      out.device = d && { signed_by_owner: d.signedByOwner, cross_signing_verified: d.crossSigningVerified };
    }
    return out;
  },

  async stop() {
    for (const c of clients.values()) c.stopClient();
    setTimeout(() => process.exit(0), 50);
    return {};
  },
};

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", async (line) => {
  let req;
  try { req = JSON.parse(line); } catch { return; }
  const answer = (body) => process.stdout.write(JSON.stringify({ id: req.id, ...body }) + "\n");
  try {
    const handler = handlers[req.cmd];
    if (!handler) throw new Error(`unknown command ${req.cmd}`);
    const name = req.client || "default";
    const client = clients.get(name);
    if (req.cmd !== "login" && req.cmd !== "stop" && !client) throw new Error(`client ${name} not logged in`);
    answer({ ok: true, ...(await handler(req, name, client)) });
  } catch (e) {
    answer({ ok: false, error: `${e?.name || "Error"}: ${e?.message || e}` });
  }
});
rl.on("close", () => { for (const c of clients.values()) c.stopClient(); process.exit(0); });
