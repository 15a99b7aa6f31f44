// Entry point TensorBoard loads in the Invariance tab's iframe; the views live in the other modules.
import {startApp} from "./static/app.js";

export async function render() {
  await startApp(document.body);
}
