// Light or dark: follows TensorBoard's dark mode (the "dark-mode" class on the parent page's body, same
// origin) and, outside TensorBoard, the system's prefers-color-scheme.

/** Keeps the class "tm-dark" on `body` in step with TensorBoard's (or the system's) dark mode; calls
 *  onChange(dark) when it changes later (not for the theme found at the start). */
export function followTheme(body, onChange = () => {}) {
  let started = false;
  const apply = (dark) => {
    const change = body.classList.contains("tm-dark") !== dark;
    body.classList.toggle("tm-dark", dark);
    if (change && started) onChange(dark);
  };
  let hostBody = null;
  try {
    hostBody = window.parent !== window ? window.parent.document.body : null;
  } catch {
    hostBody = null;
  }
  if (hostBody) {
    apply(hostBody.classList.contains("dark-mode"));
    new MutationObserver(() => apply(hostBody.classList.contains("dark-mode"))).observe(hostBody, {attributes: true, attributeFilter: ["class"]});
    started = true;
    return;
  }
  const media = window.matchMedia("(prefers-color-scheme: dark)");
  apply(media.matches);
  started = true;
  media.addEventListener("change", (event) => apply(event.matches));
}
