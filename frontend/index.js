// Entry point TensorBoard loads in the Invariance tab's iframe; the views live in the other modules.
import {startApp} from "./static/app.js";

/** Called by TensorBoard once the iframe has loaded this module: starts the tab in the iframe's body. */
export async function render() {
  await startApp(document.body);
}
