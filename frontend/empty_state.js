// What the tab shows before any run has invariance data: the two lines to add to a training loop.
import {html} from "./plot.js";

const SNIPPET = [
  "import tm_tensorboard",
  "",
  "monitor = tm_tensorboard.Monitor(model, probe, tm_tensorboard.transforms.rotations(16), logdir=\"runs/rotated\")",
  "for global_step, batch in enumerate(loader):",
  "    ...  # your training step, unchanged",
  "    monitor.step(global_step)",
].join("\n");

/** Fills `container` with the empty state. */
export function renderEmptyState(container) {
  const box = html("div", "tm-empty");
  box.id = "tm-empty";
  const code = html("pre");
  code.append(html("code", "", SNIPPET));
  box.append(
    html("h2", "", "No invariance data yet"),
    html("p", "", "Add two lines to your training loop: create a Monitor once, call monitor.step(global_step) every step."),
    code,
    html("p", "", "Then run tensorboard --logdir runs. This tab updates when TensorBoard reloads its data."),
  );
  container.replaceChildren(box);
}
