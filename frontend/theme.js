// Light or dark: follows TensorBoard's dark mode (the "dark-mode" class on the parent page's body, same
// origin) and, outside TensorBoard, the system's prefers-color-scheme.

/** Keeps the class "tm-dark" on `body` in step with TensorBoard's (or the system's) dark mode. */
export function followTheme(body) {
  const apply = (dark) => body.classList.toggle("tm-dark", dark);
  let hostBody = null;
  try {
    hostBody = window.parent !== window ? window.parent.document.body : null;
  } catch {
    hostBody = null;
  }
  if (hostBody) {
    apply(hostBody.classList.contains("dark-mode"));
    new MutationObserver(() => apply(hostBody.classList.contains("dark-mode"))).observe(hostBody, {attributes: true, attributeFilter: ["class"]});
    return;
  }
  const media = window.matchMedia("(prefers-color-scheme: dark)");
  apply(media.matches);
  media.addEventListener("change", (event) => apply(event.matches));
}
