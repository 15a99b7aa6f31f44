// The one hover tooltip of the tab (element id "tm-tooltip"): lines of text, never HTML.
import {html} from "./plot.js";

const OFFSET = 14;

/** Creates the tooltip element in `root`; returns {show(event, lines, data), hide()}. */
export function createTooltip(root) {
  const element = html("div", "tm-tooltip");
  element.id = "tm-tooltip";
  element.hidden = true;
  element.setAttribute("role", "tooltip");
  root.append(element);

  return {
    /** Shows `lines` ([text, className?] or text) near the pointer; `data` becomes data-* attributes. */
    show(event, lines, data = {}) {
      element.replaceChildren(
        ...lines.map((line) => {
          const [text, className] = Array.isArray(line) ? line : [line, ""];
          return html("div", className, text);
        }),
      );
      for (const name of Object.keys(element.dataset)) delete element.dataset[name];
      Object.assign(element.dataset, data);
      element.hidden = false;
      const {innerWidth, innerHeight} = window;
      const box = element.getBoundingClientRect();
      const left = event.clientX + OFFSET + box.width > innerWidth ? event.clientX - OFFSET - box.width : event.clientX + OFFSET;
      const top = event.clientY + OFFSET + box.height > innerHeight ? event.clientY - OFFSET - box.height : event.clientY + OFFSET;
      element.style.left = `${Math.max(0, left)}px`;
      element.style.top = `${Math.max(0, top)}px`;
    },
    hide() {
      element.hidden = true;
    },
  };
}
