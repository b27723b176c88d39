// A small line chart on a canvas for the Live tab: the last `points` readings of one or two series, scaled to
// the larger of their peak and a floor, with that scale written in the corner. The first series' newest and
// largest readings are also left on the canvas as data attributes (last, peak), which the browser tests read.

export class Sparkline {
  constructor(canvas, { colors = ["#2b6cb0", "#c05621"], floor = 1, points = 90, format = (v) => String(v) } = {}) {
    this.canvas = canvas;
    this.colors = colors;
    this.floor = floor;
    this.points = points;
    this.format = format;
    this.series = colors.map(() => []);
  }

  push(...values) {
    values.forEach((value, i) => {
      const s = this.series[i];
      s.push(Number.isFinite(value) ? value : 0);
      if (s.length > this.points) s.shift();
    });
    Object.assign(this.canvas.dataset, { last: String(values[0]), peak: String(Math.max(...this.series[0], 0)) });
    this.draw(Math.max(...this.series.flat(), 0));
  }

  draw(peak) {
    const { canvas } = this;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width, height = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(width * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const top = Math.max(peak, this.floor);
    ctx.strokeStyle = "#d0d7de";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(0, height - 0.5);
    ctx.lineTo(width, height - 0.5);
    ctx.stroke();
    this.series.forEach((s, i) => {
      if (!s.length) return;
      ctx.strokeStyle = this.colors[i];
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      s.forEach((value, j) => {
        const x = (width * (j + this.points - s.length)) / (this.points - 1);
        const y = height - 2 - ((height - 4) * value) / top;
        if (j === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
    });
    ctx.fillStyle = "#57606a";
    ctx.font = "11px sans-serif";
    ctx.fillText(`max ${this.format(top)}`, 4, 12);
  }
}
