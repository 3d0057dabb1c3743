#!/usr/bin/env python3
"""Drive the sendguard dashboard in headless Chromium (Selenium + chromedriver).

usage: dashboard_driver.py URL SCREENSHOT_PATH PROVIDER USER_DATA_DIR TRACE_RCPT

Opens URL (the dashboard with `#token=...`), waits until the providers table
shows PROVIDER as suspended and the received counter is above zero, takes a
screenshot and checks it (PNG decoded with the standard library: dimensions,
and dark text pixels inside the received counter's box), clicks PROVIDER's
Resume button and waits until the row no longer says suspended, then
searches the trace for TRACE_RCPT and reads the message's events. Prints one
JSON object with what it saw; exits 0 even when a step failed (`error` says
which), so the Rust test reports it.
"""

import json
import struct
import sys
import time
import zlib

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

WAIT = 15.0


def png_pixels(data):
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, color, _, _, interlace = ihdr
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unexpected PNG format {ihdr}"
    bpp = 4 if color == 6 else 3
    raw = zlib.decompress(idat)
    stride = w * bpp
    assert len(raw) == h * (stride + 1), "truncated PNG data"
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pr = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pr) & 0xFF
        rows.append(line)
        prev = line
    return w, h, bpp, rows


def png_header(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">IIBB", data[16:26])


def dark_pixels(png):
    w, h, bpp, rows = png_pixels(png)
    n = 0
    for line in rows:
        for x in range(w):
            if line[x * bpp] + line[x * bpp + 1] + line[x * bpp + 2] < 300:
                n += 1
    return w, h, n


def wait_for(what, cond):
    deadline = time.time() + WAIT
    last = None
    while time.time() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # element not there yet
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what} (last error: {last})")


def main():
    url, shot, provider, profile, rcpt = sys.argv[1:6]
    out = {"step": "start"}
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1400",
    ]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
    try:
        driver.set_page_load_timeout(WAIT)
        out["step"] = "load"
        driver.get(url)
        out["url_after_load"] = driver.current_url
        sel = f'#providers tr[data-provider="{provider}"]'

        out["step"] = "wait for suspended"
        wait_for(
            f"{provider} suspended and received > 0",
            lambda: driver.find_element(By.CSS_SELECTOR, sel + " td.state").text == "suspended"
            and float(driver.find_element(By.ID, "received-total").text) > 0,
        )
        out["received"] = float(driver.find_element(By.ID, "received-total").text)
        out["updated"] = driver.find_element(By.ID, "updated").text
        out["provider_row"] = driver.find_element(By.CSS_SELECTOR, sel).text
        out["holds"] = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#holds tbody tr")]
        out["domains"] = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#domains tbody tr")]
        out["error_box"] = driver.find_element(By.ID, "error").text

        out["step"] = "screenshot"
        png = driver.get_screenshot_as_png()
        with open(shot, "wb") as f:
            f.write(png)
        w, h, _, _ = png_header(png)
        # The counter's own pixels (element screenshot, decoded here): the
        # number is drawn, not just present in the DOM.
        cw, ch, dark = dark_pixels(driver.find_element(By.ID, "received-total").screenshot_as_png)
        out["png"] = {"bytes": len(png), "width": w, "height": h}
        out["received_png"] = {"width": cw, "height": ch, "dark_pixels": dark}

        out["step"] = "click resume"
        driver.find_element(By.CSS_SELECTOR, f'button[data-resume-provider="{provider}"]').click()
        wait_for(
            f"{provider} no longer suspended",
            lambda: not driver.find_elements(By.CSS_SELECTOR, f'button[data-resume-provider="{provider}"]')
            and (
                not driver.find_elements(By.CSS_SELECTOR, sel)
                or driver.find_element(By.CSS_SELECTOR, sel + " td.state").text != "suspended"
            ),
        )
        out["step"] = "trace"
        box = driver.find_element(By.ID, "trace-query")
        box.send_keys(rcpt)
        driver.find_element(By.CSS_SELECTOR, "#trace-form button").click()
        wait_for(
            "the trace events of the message",
            lambda: any(
                "received" in r.text for r in driver.find_elements(By.CSS_SELECTOR, "#trace-events tbody tr")
            ),
        )
        out["trace_results"] = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#trace-results tbody tr")]
        out["trace_events"] = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#trace-events tbody tr")]
        out["step"] = "done"
        out["ok"] = True
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        try:
            driver.save_screenshot(shot + ".failed.png")
            out["body_text"] = driver.find_element(By.TAG_NAME, "body").text[:4000]
        except Exception:
            pass
    finally:
        try:
            out["console"] = [
                {"level": m.get("level"), "message": m.get("message")} for m in driver.get_log("browser")
            ]
        except Exception as e:
            out["console_error"] = str(e)
        driver.quit()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
