// TensorBoard's plugin host protocol (tensorboard/components/experimental/plugin_lib): the iframe posts
// "experimental.bootstrap" with a MessagePort to the parent page; the host then sends JSON messages
// {type, id, payload, error, isReply} on it, among them "experimental.DataReloaded" after each reload
// (the reload button and auto-reload) and "experimental.RunsChanged". Every message gets a reply.

const RELOAD_MESSAGES = new Set(["experimental.DataReloaded", "experimental.RunsChanged"]);

/** Calls onReload() whenever TensorBoard reloads its data (nothing happens outside TensorBoard's page). */
export function listenForReloads(onReload) {
  if (window.parent === window) return;
  const channel = new MessageChannel();
  channel.port1.addEventListener("message", (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (!message || message.isReply) return;
    channel.port1.postMessage(JSON.stringify({type: message.type, id: message.id, payload: null, error: null, isReply: true}));
    if (RELOAD_MESSAGES.has(message.type)) onReload();
  });
  channel.port1.start();
  window.parent.postMessage("experimental.bootstrap", window.location.origin, [channel.port2]);
}
